"""Black-box proxy import: images of the subject made by any supervisor elsewhere (e.g.
AttnDreamBooth outputs), from a folder or `s3://` prefix, become a proxy Dataset like a drawn
one, since the student needs only the images. Each image is checked and normalised as ingest
checks subject photos; a caption file `<image stem>.txt` beside an image becomes its prompt."""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm.auto import tqdm

from proxytune.core.contracts import (
    IMPORTED,
    PROXY_FILE,
    ProxyInfo,
    ProxyRecord,
    SubjectRef,
    proxy_file,
    write_manifest,
)
from proxytune.core.fsutil import atomic_directory, atomic_write_bytes, sha256_json
from proxytune.core.images import png_bytes
from proxytune.core.params import IngestParams, ProxyParams
from proxytune.core.prompts import evaluation_overlap
from proxytune.core.tracking import Tracker
from proxytune.stages.ingest import (
    DEFAULT_LIMITS,
    IngestError,
    SourceFile,
    list_sources,
    read_photo,
    read_source,
)

log = logging.getLogger(__name__)
CAPTION_SUFFIX = ".txt"


def import_proxy(
    source_uri: str,
    out_dir: str | Path,
    subject: SubjectRef,
    params: ProxyParams,
    tracker: Tracker | None = None,
    limits: IngestParams = DEFAULT_LIMITS,
) -> ProxyInfo:
    """Images of the subject made elsewhere (any supervisor, e.g. AttnDreamBooth outputs), from a
    folder or `s3://` prefix, as a proxy Dataset like a drawn one: the student needs only images.

    Every image is checked against `limits` (`IngestParams`: file size, pixels, shortest side),
    decoded and normalised as ingest does (a bad file fails, naming it, and nothing is written)
    and exact duplicates are dropped. An image's prompt is its caption file
    `<stem>.txt` if there is one (it must name the subject's identifier), else the proxy prompt
    a drawn image of that index would get. One task imports the whole set: it is I/O, not GPU."""
    tracker = tracker or Tracker()
    images, captions = _import_sources(source_uri)
    prompts = params.prompts(subject.identifier, subject.class_noun)
    records: list[ProxyRecord] = []
    pixels: dict[str, str] = {}
    with atomic_directory(out_dir) as tmp:
        for source in tqdm(images, desc="importing proxy images", unit="img", mininterval=2.0):
            photo = read_photo(source, limits)
            if photo.pixel_sha256 in pixels:
                log.warning("%s duplicates %s; skipped", source.name, pixels[photo.pixel_sha256])
                continue
            pixels[photo.pixel_sha256] = source.name
            index = len(records)
            caption = _caption(captions, source.name, subject.identifier, limits)
            prompt = caption or prompts[index % len(prompts)]
            file = proxy_file(index, params.shard_size)
            (tmp / file).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(tmp / file, png_bytes(photo.image))
            records.append(ProxyRecord(file=file, prompt=prompt, supervisor=IMPORTED, source=source.name))
        overlapping = evaluation_overlap({r.prompt for r in records}, subject.identifier, subject.class_noun)
        for record in records:
            record.evaluation_prompt = record.prompt in overlapping or None
        recipe = {"source_uri": source_uri, **params.model_dump(include={"prompt_template", "prompt_bank"})}
        info = ProxyInfo(
            key=sha256_json({"pixels": list(pixels), "prompts": [r.prompt for r in records], **recipe}),
            subject=subject.name,
            identifier=subject.identifier,
            class_noun=subject.class_noun,
            supervisor=f"{IMPORTED}:{source_uri}",
            params=recipe,
            num_images=len(records),
            complete=True,
        )
        write_manifest(tmp, records)
        info.write(tmp / PROXY_FILE)
    tracker.log_params({"source_uri": source_uri, "key": info.key, "supervisor": IMPORTED})
    tracker.log_metric("proxy_images", len(records))
    log.info("imported %d proxy images of %s from %s", len(records), subject.name, source_uri)
    return info


def check_proxy_import(source_uri: str, identifier: str, limits: IngestParams = DEFAULT_LIMITS) -> int:
    """Validate a proxy import without writing anything (every image checked against `limits`
    and decoded, one at a time, every caption checked); returns its image count. Raises
    IngestError naming the problem."""
    images, captions = _import_sources(source_uri)
    for source in images:
        read_photo(source, limits)
        _caption(captions, source.name, identifier, limits)
    return len(images)


def _import_sources(source_uri: str) -> tuple[list[SourceFile], dict[str, SourceFile]]:
    """The image files of an import and its caption files by stem."""
    files = list_sources(source_uri, what="proxy import")
    captions = {Path(f.name).stem: f for f in files if f.name.lower().endswith(CAPTION_SUFFIX)}
    images = [f for f in files if not f.name.lower().endswith(CAPTION_SUFFIX)]
    if not images:
        raise IngestError(f"no images in proxy import {source_uri}")
    orphans = sorted(set(captions) - {Path(f.name).stem for f in images})
    if orphans:
        raise IngestError(f"proxy import {source_uri}: {orphans[0]}{CAPTION_SUFFIX} captions no image")
    return images, captions


def _caption(
    captions: dict[str, SourceFile], image_name: str, identifier: str, limits: IngestParams
) -> str | None:
    source = captions.get(Path(image_name).stem)
    if source is None:
        return None
    try:
        caption = " ".join(read_source(source, limits).decode("utf-8").split())
    except UnicodeDecodeError:
        raise IngestError(f"{source.name}: a caption must be UTF-8 text") from None
    if identifier not in caption.split():
        raise IngestError(
            f"{source.name}: the caption {caption!r} does not name the subject's identifier {identifier!r} "
            "(the student learns the subject from it; set the subject's identifier to the one used)"
        )
    return caption
