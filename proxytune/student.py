"""Student tuning: LoRA on the AR model, trained on the proxy dataset only.

The proxy images are VQ-encoded once into a token cache (`token-cache/<key>.safetensors`
in the object store, keyed by student weights, resolution and proxy dataset), so repeated
or resumed runs, and later epochs, never re-encode. The loss is cross-entropy on the image
tokens given the prompt, with prompt dropout for classifier-free guidance.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from proxytune.backends._base import ModelSource, StudentBackend, default_device
from proxytune.config import StudentParams
from proxytune.contracts import AdapterCard, ProxyRecord, read_adapter_card
from proxytune.fsutil import sha256_json
from proxytune.images import to_tensor
from proxytune.proxy import load_proxy
from proxytune.registry import STUDENTS
from proxytune.storage import ObjectStore, join
from proxytune.tracking import Tracker
from proxytune.training import AdapterSpec, tune_adapter

log = logging.getLogger(__name__)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EVAL_SAMPLES = 64
ENCODE_BATCH = 16


def token_cache(
    backend: StudentBackend,
    source: ModelSource,
    dataset_dir: Path,
    proxy_key: str,
    records: list[ProxyRecord],
    store: ObjectStore | None,
) -> torch.Tensor:
    """VQ codes (N, T) of the proxy images, from the store if encoded before."""
    key = sha256_json(
        {
            "backend": backend.name,
            "source": source.id,
            "revision": source.revision,
            "resolution": backend.resolution,
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


def tune_student(
    proxy_dir: str | Path,
    out_dir: str | Path,
    params: StudentParams,
    store: ObjectStore | None = None,
    tracker: Tracker | None = None,
    device: torch.device | None = None,
) -> AdapterCard:
    """LoRA-tune the student on the proxy Dataset in `proxy_dir`; adapter to `out_dir`."""
    from peft import LoraConfig, get_peft_model

    tracker = tracker or Tracker()
    proxy_dir = Path(proxy_dir)
    info, records = load_proxy(proxy_dir)
    backend: StudentBackend = STUDENTS.create(params.backend)
    source = ModelSource(params.model_source) if params.model_source else backend.source
    log.info("loading student %s (%s)", backend.name, source.id)
    backend.load(device or default_device(), source)
    alpha = params.alpha or float(params.rank)
    codes = token_cache(backend, source, proxy_dir, info.key, records, store)
    prompts = [r.prompt for r in records]
    recorded = {**params.model_dump(), "alpha": alpha, "proxy_key": info.key, "proxy_images": len(records)}
    tracker.log_params(recorded)

    config = LoraConfig(r=params.rank, lora_alpha=alpha, target_modules=backend.lora_target_modules)
    peft_model = get_peft_model(backend.model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()
    log.info("student LoRA: %d trainable parameters", sum(p.numel() for p in trainable))

    def batch_loss(generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(0, len(records), (params.batch_size,), generator=generator)
        unconditional = (
            torch.rand(params.batch_size, generator=generator) < params.null_prompt_prob
        ).tolist()
        inputs = backend.tokenize([prompts[i] for i in index], unconditional)
        return backend.nll(inputs, codes[index])

    held = min(EVAL_SAMPLES, len(records))
    held_inputs = backend.tokenize(prompts[:held], [False] * held)

    @torch.no_grad()
    def eval_nll() -> float:
        return backend.nll(held_inputs, codes[:held]).item()

    spec = AdapterSpec(
        kind="student",
        backend=backend.name,
        source=source,
        subjects=info.subject.split(","),
        identifier=info.identifier,
        class_noun=info.class_noun,
        params=recorded,
    )

    def save_weights(folder: Path) -> list[str]:
        peft_model.save_pretrained(str(folder), safe_serialization=True)
        return [ADAPTER_WEIGHTS, "adapter_config.json"]

    return tune_adapter(spec, params, trainable, batch_loss, eval_nll, save_weights, out_dir, tracker)


def load_student(
    adapter_dir: str | Path, device: torch.device | None = None
) -> tuple[StudentBackend, AdapterCard]:
    """Base student + the LoRA in `adapter_dir` (merged, for fast sampling)."""
    from peft import PeftModel

    card = read_adapter_card(adapter_dir, "student")
    backend: StudentBackend = STUDENTS.create(card.backend)
    backend.load(device or default_device(), ModelSource(card.base_model.id, card.base_model.revision))
    backend.model = PeftModel.from_pretrained(backend.model, str(adapter_dir)).merge_and_unload().eval()
    return backend, card
