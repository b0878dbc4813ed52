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
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from proxytune.backends._base import default_device
from proxytune.config import ProxyParams
from proxytune.contracts import MANIFEST_FILE, PROXY_FILE, ProxyInfo, ProxyRecord, read_adapter_card
from proxytune.fsutil import atomic_write_bytes, atomic_write_text, sha256_json
from proxytune.images import png_bytes
from proxytune.prompts import fill
from proxytune.storage import ObjectStore, join
from proxytune.supervisor import load_supervisor
from proxytune.tracking import Tracker

log = logging.getLogger(__name__)


def proxy_file(index: int, shard_size: int) -> str:
    return f"shard-{index // shard_size:05d}/{index:06d}.png"


def read_manifest(dataset_dir: str | Path) -> list[ProxyRecord]:
    path = Path(dataset_dir) / MANIFEST_FILE
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ProxyRecord.model_validate_json(line) for line in lines if line.strip()]


def write_manifest(dataset_dir: Path, records: list[ProxyRecord]) -> str:
    text = "".join(json.dumps(r.model_dump(mode="json", exclude_none=True)) + "\n" for r in records)
    atomic_write_text(dataset_dir / MANIFEST_FILE, text)
    return text


def generate_proxy(
    supervisor_dir: str | Path,
    out_dir: str | Path,
    params: ProxyParams,
    store: ObjectStore | None = None,
    tracker: Tracker | None = None,
    device: torch.device | None = None,
) -> ProxyInfo:
    """Generate (or resume, or reuse) the proxy Dataset of the supervisor in `supervisor_dir`."""
    tracker = tracker or Tracker()
    card = read_adapter_card(supervisor_dir, "supervisor")
    (subject,) = card.subjects
    prompt = fill(params.prompt_template, subject.identifier, subject.class_noun)
    recipe = params.model_dump(exclude={"batch_size"})
    info = ProxyInfo(
        key=sha256_json({"adapter": card.adapter_sha256, "base": card.base_model.model_dump(), **recipe}),
        subject=subject.name,
        identifier=subject.identifier,
        class_noun=subject.class_noun,
        supervisor=f"{card.backend}@{card.adapter_sha256[:16]}",
        params=recipe,
        num_images=params.num_images,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remote = join("proxy", info.key)
    tracker.log_params({**params.model_dump(), "key": info.key, "supervisor": info.supervisor})
    records = _resume(out, info, store, remote)
    info.write(out / PROXY_FILE)
    done = {r.file for r in records}
    missing = [i for i in range(params.num_images) if proxy_file(i, params.shard_size) not in done]
    log.info("proxy dataset %s: %d of %d images present", info.key[:12], len(records), params.num_images)
    if missing:
        backend, _ = load_supervisor(supervisor_dir, device or default_device())
        with tqdm(total=len(missing), desc="proxy images", unit="img", mininterval=2.0) as progress:
            for batch in _chunks(missing, params.batch_size):
                seeds = [params.seed + i for i in batch]
                images = backend.generate(
                    [prompt] * len(batch), seeds, params.inference_steps, params.guidance_scale
                )
                new = _save_batch(out, batch, seeds, images, prompt, info.supervisor, params.shard_size)
                records = sorted(records + new, key=lambda r: r.file)
                manifest = write_manifest(out, records)
                if store is not None:
                    for record in new:
                        store.put_file(join(remote, record.file), out / record.file)
                    store.put_bytes(join(remote, MANIFEST_FILE), manifest.encode())
                progress.update(len(batch))
                tracker.log_metric("proxy_images", len(records), len(records))
                log.info("proxy images: %d/%d", len(records), params.num_images)
    info = info.model_copy(update={"complete": True})
    info.write(out / PROXY_FILE)
    if store is not None:
        store.put_file(join(remote, PROXY_FILE), out / PROXY_FILE)
    return info


def _resume(out: Path, info: ProxyInfo, store: ObjectStore | None, remote: str) -> list[ProxyRecord]:
    """Records already generated for this exact recipe, locally or in the store."""
    if (out / PROXY_FILE).is_file() and ProxyInfo.read(out / PROXY_FILE).key != info.key:
        raise ValueError(f"{out} holds a different proxy dataset (other supervisor or settings)")
    records = {r.file: r for r in read_manifest(out) if (out / r.file).is_file()}
    if store is not None and store.exists(join(remote, MANIFEST_FILE)):
        lines = store.get_bytes(join(remote, MANIFEST_FILE)).decode().splitlines()
        for line in filter(str.strip, lines):
            record = ProxyRecord.model_validate_json(line)
            if record.file not in records:
                store.get_file(join(remote, record.file), out / record.file)
                records[record.file] = record
        log.info("resumed %d proxy images from %s/%s", len(records), store.uri, remote)
    return sorted(records.values(), key=lambda r: r.file)


def _save_batch(
    out: Path,
    batch: list[int],
    seeds: list[int],
    images: list[Image.Image],
    prompt: str,
    supervisor: str,
    shard: int,
) -> list[ProxyRecord]:
    records = []
    for index, seed, image in zip(batch, seeds, images, strict=True):
        file = proxy_file(index, shard)
        atomic_write_bytes(out / file, png_bytes(image))
        records.append(ProxyRecord(file=file, prompt=prompt, seed=seed, supervisor=supervisor))
    return records


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def load_proxy(dataset_dir: str | Path) -> tuple[ProxyInfo, list[ProxyRecord]]:
    """A complete proxy Dataset: its info and records, every listed image checked present."""
    dataset_dir = Path(dataset_dir)
    info = ProxyInfo.read(dataset_dir / PROXY_FILE)
    records = read_manifest(dataset_dir)
    if not info.complete or len(records) != info.num_images:
        raise ValueError(
            f"{dataset_dir}: incomplete proxy dataset ({len(records)} of {info.num_images} images)"
        )
    absent = [r.file for r in records if not (dataset_dir / r.file).is_file()]
    if absent:
        raise ValueError(f"{dataset_dir}: manifest lists missing images, e.g. {absent[0]}")
    return info, records
