"""Proxy generation: the tuned supervisor draws many images of the subject.

Image i uses seed `params.seed + i`, so it is the same whatever the batching and whether
the run was interrupted. The dataset is written image by image (atomically) and the
manifest is rewritten atomically after each batch, listing only images already on disk.
With an object store, progress is mirrored to `proxy/<key>/`, where `key` hashes the
adapter and the generation settings: a restarted or repeated run downloads what exists
and generates only what is missing, and a complete dataset is reused without loading the
supervisor at all.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from proxytune.backends._base import ImageEncoder, default_device
from proxytune.backends._tuned import load_supervisor
from proxytune.core.contracts import (
    MANIFEST_FILE,
    PROXY_FILE,
    ProxyInfo,
    ProxyRecord,
    proxy_file,
    read_adapter_card,
    read_manifest,
    write_manifest,
    write_manifest_text,
)
from proxytune.core.fsutil import atomic_directory, atomic_write_bytes, sha256_json
from proxytune.core.images import png_bytes
from proxytune.core.params import IngestParams, ProxyParams
from proxytune.core.prompts import evaluation_overlap
from proxytune.core.registry import SUPERVISORS
from proxytune.core.storage import ObjectStore, join
from proxytune.core.tracking import Tracker
from proxytune.stages.ingest import DEFAULT_LIMITS
from proxytune.stages.proxy_import import import_proxy

log = logging.getLogger(__name__)
SCORE_BATCH = 32


def part_indices(num_images: int, shards: int, shard: int) -> range:
    """The contiguous block of image indices that generation shard `shard` of `shards` draws."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not one of 0..{shards - 1}")
    return range(shard * num_images // shards, (shard + 1) * num_images // shards)


def part_manifest(shard: int, shards: int) -> str:
    """Where a part's progress is mirrored in the store (the merged manifest is MANIFEST_FILE)."""
    return f"parts/{shard:03d}-of-{shards:03d}.jsonl"


def generate_proxy(
    supervisor_dir: str | Path,
    out_dir: str | Path,
    params: ProxyParams,
    store: ObjectStore | None = None,
    tracker: Tracker | None = None,
    device: torch.device | None = None,
    shard: int = 0,
    limits: IngestParams = DEFAULT_LIMITS,
) -> ProxyInfo:
    """Generate (or resume, or reuse) the proxy Dataset of the supervisor in `supervisor_dir`,
    or with `params.shards` > 1 its part `shard` (images `part_indices(...)`), which
    `merge_proxy` joins into the dataset an unsharded run gives for the same seeds. A black-box
    supervisor's card (`IMPORTED`) imports its images instead (`import_proxy`, within `limits`)."""
    tracker = tracker or Tracker()
    card = read_adapter_card(supervisor_dir, "supervisor")
    (subject,) = card.subjects
    if card.imported:
        return import_proxy(card.base_model.id, out_dir, subject, params, tracker, limits)
    prompts = params.prompts(subject.identifier, subject.class_noun)
    overlapping = evaluation_overlap(prompts, subject.identifier, subject.class_noun)
    steps, guidance = SUPERVISORS.create(card.backend).generation(
        params.inference_steps, params.guidance_scale
    )
    recipe = {
        **params.model_dump(exclude={"batch_size", "shards", "keep_fraction"}),
        "inference_steps": steps,
        "guidance_scale": guidance,
    }
    part = [shard, params.shards] if params.shards > 1 else None
    indices = part_indices(params.num_images, params.shards, shard)
    info = ProxyInfo(
        key=sha256_json({"adapter": card.adapter_sha256, "base": card.base_model.model_dump(), **recipe}),
        subject=subject.name,
        identifier=subject.identifier,
        class_noun=subject.class_noun,
        supervisor=f"{card.backend}@{card.adapter_sha256[:16]}",
        params=recipe,
        num_images=params.num_images,
        part=part,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remote = join("proxy", info.key)
    progress_key = join(remote, part_manifest(*part) if part else MANIFEST_FILE)
    tracker.log_params(
        {**params.model_dump(), "key": info.key, "supervisor": info.supervisor, "part": str(part)}
    )
    records = _resume(out, info, store, remote, progress_key)
    info.write(out / PROXY_FILE)
    done = {r.file for r in records}
    missing = [i for i in indices if proxy_file(i, params.shard_size) not in done]
    log.info("proxy dataset %s: %d of %d images present", info.key[:12], len(records), len(indices))
    if missing:
        backend, _ = load_supervisor(supervisor_dir, device or default_device())
        backend.fuse_lora()  # the whole set is drawn with one adapter: merge it once
        with tqdm(total=len(missing), desc="proxy images", unit="img", mininterval=2.0) as progress:
            for batch in _chunks(missing, params.batch_size):
                seeds = [params.seed + i for i in batch]
                batch_prompts = [prompts[i % len(prompts)] for i in batch]
                images = backend.generate(batch_prompts, seeds, steps, guidance)
                new = [
                    ProxyRecord(
                        file=proxy_file(i, params.shard_size),
                        prompt=prompt,
                        seed=seed,
                        supervisor=info.supervisor,
                        evaluation_prompt=True if prompt in overlapping else None,
                    )
                    for i, seed, prompt in zip(batch, seeds, batch_prompts, strict=True)
                ]
                for record, image in zip(new, images, strict=True):
                    atomic_write_bytes(out / record.file, png_bytes(image))
                records = sorted(records + new, key=lambda r: r.file)
                manifest = write_manifest(out, records)
                if store is not None:
                    for record in new:
                        store.put_file(join(remote, record.file), out / record.file)
                    store.put_bytes(progress_key, manifest.encode())
                progress.update(len(batch))
                tracker.log_metric("proxy_images", len(records), len(records))
                log.info("proxy images: %d/%d", len(records), len(indices))
    info = info.model_copy(update={"complete": True})
    info.write(out / PROXY_FILE)
    if store is not None and part is None:
        store.put_file(join(remote, PROXY_FILE), out / PROXY_FILE)
    return info


@dataclass(frozen=True)
class Selection:
    """Keep the proxy images most like the subject: highest mean DINO cosine to its photos."""

    photos: list[Image.Image]
    encoder: ImageEncoder
    keep_fraction: float


def merge_proxy(
    part_dirs: list[str | Path],
    out_dir: str | Path,
    store: ObjectStore | None = None,
    selection: Selection | None = None,
) -> ProxyInfo:
    """Join the parts of a sharded proxy Dataset (or pass one unsharded dataset through), then
    optionally keep only the images `selection` prefers.

    Every part must be complete and of the same recipe, and together they must cover every
    shard once; unfiltered, the result is the dataset an unsharded run draws for the same
    seeds. Filtered, every kept image's score is in the manifest and the dataset gets its own
    content key (what was drawn stays in the store under the unfiltered key)."""
    parts = [(Path(d), ProxyInfo.read(Path(d) / PROXY_FILE)) for d in part_dirs]
    keys = {info.key for _, info in parts}
    if len(keys) != 1:
        raise ValueError(f"proxy parts of different datasets: {sorted(k[:12] for k in keys)}")
    counts = {info.part[1] if info.part else 1 for _, info in parts}
    seen = sorted(info.part[0] if info.part else 0 for _, info in parts)
    if len(counts) != 1 or seen != list(range(counts.pop())):
        raise ValueError(f"proxy parts cover shards {seen}: each shard must appear once")
    incomplete = [str(d) for d, info in parts if not info.complete]
    if incomplete:
        raise ValueError(f"incomplete proxy parts: {incomplete}")
    first = parts[0][1]
    found = sorted(((d, r) for d, _ in parts for r in read_manifest(d)), key=lambda item: item[1].file)
    if len(found) != first.num_images or len({r.file for _, r in found}) != len(found):
        raise ValueError(f"proxy parts hold {len(found)} images for a dataset of {first.num_images}")
    drawn = first.model_copy(update={"part": None, "complete": True})
    info, kept = (drawn, found) if selection is None else _select(drawn, found, selection)
    with atomic_directory(out_dir) as tmp:
        for directory, record in kept:
            (tmp / record.file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(directory / record.file, tmp / record.file)
        write_manifest(tmp, [r for _, r in kept])
        info.write(tmp / PROXY_FILE)
    if store is not None and first.part:
        remote = join("proxy", drawn.key)
        store.put_bytes(join(remote, MANIFEST_FILE), write_manifest_text([r for _, r in found]).encode())
        store.put_bytes(join(remote, PROXY_FILE), json.dumps(drawn.model_dump(mode="json")).encode())
    log.info("proxy dataset %s: %d images from %d part(s)", info.key[:12], len(kept), len(parts))
    return info


def _select(
    drawn: ProxyInfo, found: list[tuple[Path, ProxyRecord]], selection: Selection
) -> tuple[ProxyInfo, list[tuple[Path, ProxyRecord]]]:
    references = selection.encoder.embed_images(selection.photos)
    scores: list[float] = []
    for start in tqdm(range(0, len(found), SCORE_BATCH), desc="scoring proxy images", mininterval=2.0):
        batch = [Image.open(d / r.file).convert("RGB") for d, r in found[start : start + SCORE_BATCH]]
        features = selection.encoder.embed_images(batch)
        scores += (features @ references.T).mean(-1).tolist()
    count = max(1, math.ceil(selection.keep_fraction * len(found)))
    best = sorted(range(len(found)), key=lambda i: -scores[i])[:count]
    kept = [
        (d, r.model_copy(update={"scores": {**(r.scores or {}), "dino": scores[i]}}))
        for i, (d, r) in enumerate(found)
        if i in set(best)
    ]
    chosen = {
        "encoder": selection.encoder.name,
        "keep_fraction": selection.keep_fraction,
        "drawn": len(found),
    }
    info = drawn.model_copy(
        update={
            "key": sha256_json({"drawn": drawn.key, **chosen}),
            "num_images": len(kept),
            "selection": chosen,
        }
    )
    log.info(
        "kept %d of %d proxy images (DINO to the photos >= %.4f; mean of all %.4f)",
        len(kept),
        len(found),
        min(scores[i] for i in best),
        sum(scores) / len(scores),
    )
    return info, kept


def _index(record: ProxyRecord) -> int:
    return int(Path(record.file).stem)


def _resume(
    out: Path, info: ProxyInfo, store: ObjectStore | None, remote: str, progress_key: str
) -> list[ProxyRecord]:
    """This part's records already generated for this exact recipe, locally or in the store
    (from the merged dataset if one is complete there, else from this part's progress)."""
    if (out / PROXY_FILE).is_file() and ProxyInfo.read(out / PROXY_FILE).key != info.key:
        raise ValueError(f"{out} holds a different proxy dataset (other supervisor or settings)")
    shard, shards = info.part or (0, 1)
    mine = part_indices(info.num_images, shards, shard)
    records = {r.file: r for r in read_manifest(out) if (out / r.file).is_file() and _index(r) in mine}
    if store is not None:
        key = join(remote, MANIFEST_FILE) if store.exists(join(remote, PROXY_FILE)) else progress_key
        if store.exists(key):
            for line in filter(str.strip, store.get_bytes(key).decode().splitlines()):
                record = ProxyRecord.model_validate_json(line)
                if record.file not in records and _index(record) in mine:
                    store.get_file(join(remote, record.file), out / record.file)
                    records[record.file] = record
            log.info("resumed %d proxy images from %s/%s", len(records), store.uri, remote)
    return sorted(records.values(), key=lambda r: r.file)


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def load_proxy(dataset_dir: str | Path) -> tuple[ProxyInfo, list[ProxyRecord]]:
    """A complete proxy Dataset: its info and records, every listed image checked present."""
    dataset_dir = Path(dataset_dir)
    info = ProxyInfo.read(dataset_dir / PROXY_FILE)
    if info.part:
        raise ValueError(
            f"{dataset_dir} is part {info.part[0]} of {info.part[1]} of a proxy dataset: merge the parts"
        )
    records = read_manifest(dataset_dir)
    if not info.complete or len(records) != info.num_images:
        raise ValueError(
            f"{dataset_dir}: incomplete proxy dataset ({len(records)} of {info.num_images} images)"
        )
    absent = [r.file for r in records if not (dataset_dir / r.file).is_file()]
    if absent:
        raise ValueError(f"{dataset_dir}: manifest lists missing images, e.g. {absent[0]}")
    return info, records
