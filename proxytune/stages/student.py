"""Student tuning: LoRA on the AR model, trained on proxy datasets only.

- Token cache: each proxy dataset is VQ-encoded once into `token-cache/<key>.safetensors` in
  the object store, keyed by student weights (and revision), resolution, the encoding's
  version and the dataset, so repeated or resumed runs, and later epochs, never re-encode,
  and a changed encoding never reuses old codes.
- Held-out split: the last `holdout_fraction` of every dataset (at least one image) is never
  trained on; the card and MLflow get the loss on it and on training images, before and after.
- Several datasets (one per subject, each with its own identifier) train one joint adapter
  on their mixture: a multi-subject student.
- Memory: every pass runs in micro-batches of `micro_batch_size` images (gradients
  accumulate over the batch), with activation checkpointing on GPU.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from proxytune.backends._ar import ARStudent
from proxytune.backends._base import ModelSource, default_device
from proxytune.core.contracts import AdapterCard, ProxyInfo, ProxyRecord, SubjectRef
from proxytune.core.fsutil import sha256_json
from proxytune.core.images import to_tensor
from proxytune.core.params import StudentParams
from proxytune.core.registry import STUDENTS
from proxytune.core.storage import ObjectStore, join
from proxytune.core.tracking import Tracker
from proxytune.stages.proxy import load_proxy
from proxytune.stages.training import AdapterSpec, tune_adapter

log = logging.getLogger(__name__)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EVAL_SAMPLES = 64  # images per loss estimate (train and held-out)
ENCODE_BATCH = 16


def token_cache(
    backend: ARStudent,
    dataset_dir: Path,
    proxy_key: str,
    records: list[ProxyRecord],
    store: ObjectStore | None,
) -> torch.Tensor:
    """VQ codes (N, T) of the proxy images, from the store if encoded before."""
    source = backend.loaded_source
    key = sha256_json(
        {
            "backend": backend.name,
            "source": source.id,
            "revision": source.revision,
            "resolution": backend.resolution,
            "encoding": backend.encoding,
            "vq": source.vq,
            "proxy": proxy_key,
            "files": [r.file for r in records],
        }
    )
    remote = join("token-cache", f"{key}.safetensors")
    if store is not None and store.exists(remote):
        log.info("token cache hit: %s/%s", store.uri, remote)
        return load_safetensors(store.get_bytes(remote))["codes"]
    chunks = []
    for start in tqdm(range(0, len(records), ENCODE_BATCH), desc="VQ-encoding proxy images", mininterval=2.0):
        batch = records[start : start + ENCODE_BATCH]
        images = [Image.open(dataset_dir / r.file).convert("RGB") for r in batch]
        chunks.append(backend.encode_images(to_tensor(images, backend.resolution)).cpu())
    codes = torch.cat(chunks)
    log.info("encoded %d proxy images into %d tokens each", codes.shape[0], codes.shape[1])
    if store is not None:
        store.put_bytes(remote, save_safetensors({"codes": codes.contiguous()}, metadata={"key": key}))
    return codes


def holdout_split(count: int, fraction: float, where: str) -> tuple[range, range]:
    """Train and held-out indices of a dataset: the last ceil(fraction * count), at least one,
    are held out; none with fraction 0 (the direct baseline, which has only a few photos)."""
    held = max(1, math.ceil(fraction * count)) if fraction else 0
    if count - held < 1:
        raise ValueError(f"{where}: {count} proxy image(s) leave none to train on after holding out {held}")
    return range(count - held), range(count - held, count)


def _load_datasets(proxy_dirs: Sequence[Path]) -> list[tuple[ProxyInfo, list[ProxyRecord]]]:
    datasets = [load_proxy(d) for d in proxy_dirs]
    identifiers = [info.identifier for info, _ in datasets]
    if len(set(identifiers)) != len(identifiers):
        raise ValueError(
            f"a multi-subject student needs one identifier per subject, got {identifiers} "
            "(give each subject its own --identifier)"
        )
    return datasets


def tune_student(
    proxy_dirs: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    params: StudentParams,
    store: ObjectStore | None = None,
    tracker: Tracker | None = None,
    device: torch.device | None = None,
    training_data: str = "proxy",
) -> AdapterCard:
    """LoRA-tune the student on one or more proxy Datasets; adapter to `out_dir`.
    `training_data` names what the datasets hold in the card (`photos` for the direct baseline)."""
    from peft import LoraConfig, get_peft_model

    tracker = tracker or Tracker()
    dirs = [Path(proxy_dirs)] if isinstance(proxy_dirs, str | Path) else [Path(d) for d in proxy_dirs]
    datasets = _load_datasets(dirs)
    splits = [
        holdout_split(len(records), params.holdout_fraction, str(d))
        for d, (_, records) in zip(dirs, datasets, strict=True)
    ]
    backend: ARStudent = STUDENTS.create(params.backend)
    device = device or default_device()
    source = ModelSource(params.model_source or backend.source.id, vq=params.vq_source)
    log.info("loading student %s (%s)", backend.name, source.id)
    backend.load(device, source)

    prompts: list[str] = []
    codes, train, held = [], [], []
    for directory, (info, records), (train_part, held_part) in zip(dirs, datasets, splits, strict=True):
        offset = len(prompts)
        codes.append(token_cache(backend, directory, info.key, records, store))
        prompts += [r.prompt for r in records]
        train += [offset + i for i in train_part]
        held += [offset + i for i in held_part]
    all_codes = torch.cat(codes)
    alpha = params.alpha or float(params.rank)
    recorded = {
        **params.model_dump(),
        "alpha": alpha,
        "training_data": training_data,
        "proxy_keys": [info.key for info, _ in datasets],
        "train_images": len(train),
        "heldout_images": len(held),
    }
    tracker.log_params(recorded)

    peft_model = get_peft_model(
        backend.model, LoraConfig(r=params.rank, lora_alpha=alpha, target_modules=backend.lora_target_modules)
    )
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()
    log.info("student LoRA: %d trainable parameters", sum(p.numel() for p in trainable))
    checkpointing = (
        device.type == "cuda" if params.gradient_checkpointing is None else params.gradient_checkpointing
    )
    backend.train_mode(checkpointing)

    def micro_batches(index: list[int], unconditional: list[bool]) -> Iterator[tuple[torch.Tensor, float]]:
        micro = params.micro_batch_size or params.batch_size
        for start in range(0, len(index), micro):
            part = slice(start, start + micro)
            inputs = backend.tokenize([prompts[i] for i in index[part]], unconditional[part])
            yield backend.nll(inputs, all_codes[index[part]]), len(index[part]) / len(index)

    def batch_loss(generator: torch.Generator) -> Iterator[tuple[torch.Tensor, float]]:
        picks = torch.randint(0, len(train), (params.batch_size,), generator=generator).tolist()
        unconditional = (
            torch.rand(params.batch_size, generator=generator) < params.null_prompt_prob
        ).tolist()
        return micro_batches([train[i] for i in picks], unconditional)

    @torch.no_grad()
    def eval_losses() -> dict[str, float]:
        return {
            name: sum(loss.item() * share for loss, share in micro_batches(index, [False] * len(index)))
            for name, index in (("train", train[:EVAL_SAMPLES]), ("heldout", held[:EVAL_SAMPLES]))
            if index
        }

    spec = AdapterSpec(
        kind="student",
        backend=backend.name,
        source=backend.loaded_source,
        subjects=[
            SubjectRef(name=i.subject, identifier=i.identifier, class_noun=i.class_noun) for i, _ in datasets
        ],
        params=recorded,
    )

    def save_weights(folder: Path) -> list[str]:
        peft_model.save_pretrained(str(folder), safe_serialization=True)
        return [ADAPTER_WEIGHTS, "adapter_config.json"]

    return tune_adapter(
        spec, params, trainable, batch_loss, eval_losses, save_weights, out_dir, tracker, store
    )
