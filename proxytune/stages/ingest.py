"""Ingest: a subject's photos (local folder or s3://bucket/prefix) -> subject Dataset.

Every file is checked and decoded before anything is written, so a bad input fails with a
message naming the file and leaves nothing behind. The limits (`IngestParams`: file size,
pixel count, shortest side, distinct photos) are checked as early as the source allows: a
file's size from the folder or the S3 listing before it is read, its dimensions from the image
header before any pixel is decoded. Photos are then normalised (RGB, EXIF orientation applied,
transparency on white, 16-bit scaled to 8) and exact duplicates dropped by pixel hash.
"""

from __future__ import annotations

import functools
import io
import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from proxytune.core.contracts import SUBJECT_FILE, Subject, SubjectImage
from proxytune.core.fsutil import atomic_directory, sha256_bytes, sha256_file, sha256_json
from proxytune.core.images import normalize_rgb
from proxytune.core.params import IngestParams
from proxytune.core.storage import ObjectStore, join, open_s3_uri

log = logging.getLogger(__name__)
RECOMMENDED_COUNT = (3, 6)
SUBJECT_KEYS = ("uri", "class_noun", "name", "identifier", "proxy_uri")
SPARE_IDENTIFIERS = ("sks", "ohwx", "zwx", "qxv", "vkz", "jqp", "pxw", "kzq")  # rare tokens
DEFAULT_LIMITS = IngestParams()


class IngestError(ValueError):
    """A subject source that cannot become a subject Dataset."""


@dataclass(frozen=True)
class SubjectPhoto:
    source: str
    image: Image.Image
    pixel_sha256: str


@dataclass(frozen=True)
class SourceFile:
    """A file of a source folder or prefix, read only when needed (a proxy import holds ~1000);
    `size` is known before reading, from `sized_by` (the file system or the S3 listing)."""

    name: str
    size: int
    sized_by: str
    read: Callable[[], bytes]


def list_sources(source_uri: str, what: str = "subject") -> list[SourceFile]:
    """Every non-hidden file directly inside the source (`what` names it in errors), sorted by name.

    A link in a folder that points outside it is refused (IngestError naming the link and its
    target): a run reads what the folder holds, not whatever a link reaches on this machine;
    links to files inside the folder are read as those files."""
    if source_uri.startswith("s3://"):
        store, prefix = open_s3_uri(source_uri)
        # the listing's sizes, so an oversized object is refused before it is downloaded
        listing = store.listing(prefix + "/" if prefix else "", recursive=False)
        return [
            SourceFile(name, info.size, "the S3 listing", functools.partial(store.get_bytes, key))
            for key, info in sorted(listing.items())
            if not (name := key.rsplit("/", 1)[-1]).startswith(".")
        ]
    folder = Path(source_uri).expanduser()
    if not folder.exists():
        raise IngestError(f"{what} folder {folder} does not exist")
    if not folder.is_dir():
        raise IngestError(f"{what} source {folder} is not a folder")
    inside = folder.resolve()
    paths = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    for link in filter(Path.is_symlink, paths):
        if not link.resolve().is_relative_to(inside):
            raise IngestError(
                f"{what} folder {folder}: {link.name} is a link to {link.resolve()}, outside the folder; "
                "copy the file in instead"
            )
    return [
        SourceFile(p.name, p.stat().st_size, "the file system", p.read_bytes) for p in paths if p.is_file()
    ]


def read_source(source: SourceFile, limits: IngestParams = DEFAULT_LIMITS) -> bytes:
    """A source file's bytes, its size checked against `limits` before it is read or downloaded."""
    if source.size > limits.max_file_bytes:
        raise IngestError(
            f"{source.name}: {source.size:,} bytes according to {source.sized_by}, over the limit of "
            f"{limits.max_file_bytes:,} bytes (ingest.max_file_bytes); not read"
        )
    return source.read()


def read_photo(source: SourceFile, limits: IngestParams = DEFAULT_LIMITS) -> SubjectPhoto:
    """`decode_photo` on a source file read by `read_source`."""
    return decode_photo(source.name, read_source(source, limits), limits)


def decode_photo(name: str, data: bytes, limits: IngestParams = DEFAULT_LIMITS) -> SubjectPhoto:
    """Decode and normalise one image; its dimensions are checked against `limits` from the
    header, before any pixel is decoded (and so allocated); Pillow's decompression-bomb guard
    stays on for what is beyond any allowed limit. Raises IngestError naming `name`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # limits.max_pixels rules
            opened = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise IngestError(
            f"{name}: more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels (Pillow's decompression-bomb guard, "
            f"from the header), over the limit of {limits.max_pixels:,} pixels (ingest.max_pixels)"
        ) from None
    except UnidentifiedImageError:
        raise IngestError(f"{name}: not an image file (cannot be decoded as an image)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise IngestError(f"{name}: unreadable or corrupt image ({error})") from None
    with opened:
        check_dimensions(name, opened.size, limits)
        try:
            opened.load()
        except (OSError, SyntaxError, ValueError) as error:
            raise IngestError(f"{name}: unreadable or corrupt image ({error})") from None
        try:
            image = normalize_rgb(opened)
        except ValueError as error:
            raise IngestError(f"{name}: {error}") from None
    pixels = f"{image.size}".encode() + image.tobytes()
    return SubjectPhoto(name, image, sha256_bytes(pixels))


def check_dimensions(name: str, size: tuple[int, int], limits: IngestParams) -> None:
    """An image's width and height within `limits`, else IngestError naming `name` and the limit."""
    width, height = size
    if width * height > limits.max_pixels:
        raise IngestError(
            f"{name}: {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{limits.max_pixels:,} pixels (ingest.max_pixels)"
        )
    if min(size) < limits.min_side:
        raise IngestError(
            f"{name}: {width}x{height} pixels, under the minimum side of {limits.min_side} px "
            "(ingest.min_side)"
        )


def scan_subject(source_uri: str, limits: IngestParams = DEFAULT_LIMITS) -> list[SubjectPhoto]:
    """Read and decode every photo of a subject, duplicates removed; raises IngestError, also
    when fewer than `limits.min_photos` distinct photos remain (copies teach nothing new)."""
    sources = list_sources(source_uri)
    if not sources:
        raise IngestError(f"no images in {source_uri}")
    photos: dict[str, SubjectPhoto] = {}
    for source in sources:
        photo = read_photo(source, limits)
        if photo.pixel_sha256 in photos:
            log.warning("%s duplicates %s; skipped", source.name, photos[photo.pixel_sha256].source)
            continue
        photos[photo.pixel_sha256] = photo
    if len(photos) < limits.min_photos:
        dropped = len(sources) - len(photos)
        raise IngestError(
            f"{source_uri}: {_count(len(sources), 'file')}, {_count(len(photos), 'distinct photo')} after "
            f"dropping {_count(dropped, 'duplicate')}; need at least {limits.min_photos} (ingest.min_photos)"
        )
    low, high = RECOMMENDED_COUNT
    if not low <= len(photos) <= high:
        log.warning(
            "%d distinct photos in %s; DreamBooth works best with %d-%d", len(photos), source_uri, low, high
        )
    return list(photos.values())


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


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
    limits: IngestParams = DEFAULT_LIMITS,
) -> Subject:
    """Write the subject Dataset to `out_dir` (atomically) and, if given, publish it to
    `store` under `subjects/<content hash>/`. `proxy_uri`: the subject's proxy images are
    imported from there (a black-box supervisor) instead of drawn by a tuned one. Every photo
    is checked against `limits` before anything is written."""
    draft = subject_fields(source_uri, class_noun, name, identifier, proxy_uri)
    photos = scan_subject(source_uri, limits)
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
