"""Ingest: a subject's photos (local folder or s3://bucket/prefix) -> subject Dataset.

Every file is decoded and normalised before anything is written (RGB, EXIF orientation
applied, transparency on white, duplicates dropped by pixel hash), so a bad input fails
with a message naming the file and leaves nothing behind.
"""

from __future__ import annotations

import functools
import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from proxytune.contracts import SUBJECT_FILE, Subject, SubjectImage
from proxytune.fsutil import atomic_directory, sha256_bytes, sha256_file, sha256_json
from proxytune.images import normalize_rgb
from proxytune.storage import ObjectStore, join, open_s3_uri

log = logging.getLogger(__name__)
RECOMMENDED_COUNT = (3, 6)
SUBJECT_KEYS = ("uri", "class_noun", "name", "identifier", "proxy_uri")
SPARE_IDENTIFIERS = ("sks", "ohwx", "zwx", "qxv", "vkz", "jqp", "pxw", "kzq")  # rare tokens


class IngestError(ValueError):
    """A subject source that cannot become a subject Dataset."""


@dataclass(frozen=True)
class SubjectPhoto:
    source: str
    image: Image.Image
    pixel_sha256: str


@dataclass(frozen=True)
class SourceFile:
    """A file of a source folder or prefix, read only when needed (a proxy import holds ~1000)."""

    name: str
    read: Callable[[], bytes]


def list_sources(source_uri: str, what: str = "subject") -> list[SourceFile]:
    """Every non-hidden file directly inside the source (`what` names it in errors), sorted by name."""
    if source_uri.startswith("s3://"):
        store, prefix = open_s3_uri(source_uri)
        keys = [
            k for k in store.list(prefix + "/" if prefix else "") if "/" not in k[len(prefix) :].strip("/")
        ]
        files = [(k.rsplit("/", 1)[-1], k) for k in keys]
        return [
            SourceFile(name, functools.partial(store.get_bytes, key))
            for name, key in sorted(files)
            if not name.startswith(".")
        ]
    folder = Path(source_uri).expanduser()
    if not folder.exists():
        raise IngestError(f"{what} folder {folder} does not exist")
    if not folder.is_dir():
        raise IngestError(f"{what} source {folder} is not a folder")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return [SourceFile(p.name, p.read_bytes) for p in paths]


def decode_photo(name: str, data: bytes) -> SubjectPhoto:
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            image = normalize_rgb(opened)
    except UnidentifiedImageError:
        raise IngestError(f"{name}: not an image file (cannot be decoded as an image)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise IngestError(f"{name}: unreadable or corrupt image ({error})") from None
    pixels = f"{image.size}".encode() + image.tobytes()
    return SubjectPhoto(name, image, sha256_bytes(pixels))


def scan_subject(source_uri: str) -> list[SubjectPhoto]:
    """Read and decode every photo of a subject, duplicates removed; raises IngestError."""
    sources = list_sources(source_uri)
    if not sources:
        raise IngestError(f"no images in {source_uri}")
    photos: dict[str, SubjectPhoto] = {}
    for source in sources:
        name = source.name
        photo = decode_photo(name, source.read())
        if photo.pixel_sha256 in photos:
            log.warning("%s duplicates %s; skipped", name, photos[photo.pixel_sha256].source)
            continue
        photos[photo.pixel_sha256] = photo
    low, high = RECOMMENDED_COUNT
    if not low <= len(photos) <= high:
        log.warning(
            "%d distinct photos in %s; DreamBooth works best with %d-%d", len(photos), source_uri, low, high
        )
    return list(photos.values())


def subject_fields(
    source_uri: str, class_noun: str, name: str | None, identifier: str, proxy_uri: str | None = None
) -> dict[str, str]:
    """The subject's descriptive fields, validated (raises IngestError) before any photo is read;
    `proxy_uri` only when the proxy images are imported instead of drawn."""
    fields = dict(
        name=name or default_subject_name(source_uri),
        class_noun=class_noun,
        identifier=identifier,
        source_uri=source_uri,
        **({"proxy_uri": proxy_uri} if proxy_uri else {}),
    )
    try:
        Subject.model_validate({**fields, "images": [{"file": "-", "sha256": "-"}]})
    except ValidationError as error:
        problems = "; ".join(e["msg"] for e in error.errors(include_url=False))
        raise IngestError(f"invalid subject: {problems}") from None
    return fields


def plan_subjects(subjects: list[dict[str, str]]) -> list[dict[str, str]]:
    """The validated fields of every subject of a run (`uri`, `class_noun`, optional `name`,
    `identifier` and `proxy_uri` in; `subject_fields` out), before any photo is read.

    A multi-subject student tells its subjects apart by their identifiers, so they must differ:
    a subject without one gets the first of `SPARE_IDENTIFIERS` not taken; names must differ too
    (they name the datasets, the report sections and the registered model)."""
    if not subjects:
        raise IngestError("a run needs at least one subject")
    unknown = {k for s in subjects for k in s} - set(SUBJECT_KEYS)
    if unknown:
        raise IngestError(f"unknown subject field(s) {sorted(unknown)}; use {', '.join(SUBJECT_KEYS)}")
    taken = {s["identifier"] for s in subjects if s.get("identifier")}
    spare = (i for i in SPARE_IDENTIFIERS if i not in taken)
    planned = []
    for subject in subjects:
        if not subject.get("uri") or not subject.get("class_noun"):
            raise IngestError(f"every subject needs a uri and a class_noun, got {subject}")
        identifier = subject.get("identifier") or next(spare, None)
        if identifier is None:
            raise IngestError(f"more than {len(SPARE_IDENTIFIERS)} subjects: give each its own identifier")
        planned.append(
            subject_fields(
                subject["uri"],
                subject["class_noun"],
                subject.get("name") or None,
                identifier,
                subject.get("proxy_uri") or None,
            )
        )
    for field in ("name", "identifier"):
        values = [p[field] for p in planned]
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise IngestError(f"subjects must have distinct {field}s; {', '.join(repeated)} is used twice")
    return planned


def default_subject_name(source_uri: str) -> str:
    tail = source_uri.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^a-z0-9_.-]+", "-", tail.lower()).strip("-.") or "subject"


def ingest(
    source_uri: str,
    out_dir: str | Path,
    class_noun: str,
    name: str | None = None,
    identifier: str = "sks",
    store: ObjectStore | None = None,
    proxy_uri: str | None = None,
) -> Subject:
    """Write the subject Dataset to `out_dir` (atomically) and, if given, publish it to
    `store` under `subjects/<content hash>/`. `proxy_uri`: the subject's proxy images are
    imported from there (a black-box supervisor) instead of drawn by a tuned one."""
    draft = subject_fields(source_uri, class_noun, name, identifier, proxy_uri)
    photos = scan_subject(source_uri)
    with atomic_directory(out_dir) as tmp:
        (tmp / "images").mkdir()
        entries = []
        for i, photo in enumerate(photos):
            file = f"images/{i:02d}.png"
            photo.image.save(tmp / file, format="PNG")
            entries.append(SubjectImage(file=file, sha256=sha256_file(tmp / file)))
        subject = Subject(**draft, images=entries)
        subject.write(tmp / SUBJECT_FILE)
    log.info(
        "ingested %d photos of %r (%s) from %s", len(entries), subject.name, subject.class_noun, source_uri
    )
    if store is not None:
        prefix = join("subjects", subject_key(subject))
        if not store.exists(join(prefix, SUBJECT_FILE)):
            store.upload_dir(out_dir, prefix)
        log.info("subject dataset stored at %s/%s", store.uri, prefix)
    return subject


def subject_key(subject: Subject) -> str:
    """Content address of a subject dataset: its pixels, class noun, identifier and proxy import."""
    return sha256_json(
        {
            "images": [i.sha256 for i in subject.images],
            "class_noun": subject.class_noun,
            "identifier": subject.identifier,
            **({"proxy_uri": subject.proxy_uri} if subject.proxy_uri else {}),
        }
    )


def load_subject(dataset_dir: str | Path) -> tuple[Subject, list[Image.Image]]:
    """Read a subject Dataset back, checking each image against its recorded hash."""
    dataset_dir = Path(dataset_dir)
    subject = Subject.read(dataset_dir / SUBJECT_FILE)
    images = []
    for entry in subject.images:
        path = dataset_dir / entry.file
        if not path.is_file() or sha256_file(path) != entry.sha256:
            raise ValueError(f"{path} is missing or does not match its sha256 in {SUBJECT_FILE}")
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return subject, images
