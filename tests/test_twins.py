"""Real-shape twins of the real student backends.

Each twin is the backend's published configuration (kept as data in
`proxytune/backends/configs/`) with the depth cut to one layer and random weights, run on
the CPU at the real resolution and token count, saved in the hub's folder layout and loaded
back through the backend's real loading path. Tiny models hide what only real shapes show
(a 16384- or 8192-code VQ, 576 or 2304 codes with row tokens, the real special-token ids).
"""

from __future__ import annotations

import shutil

import pytest
import torch

import proxytune.backends._ar as ar
from proxytune.backends._ar import nearest_codes
from proxytune.backends._base import ModelSource
from proxytune.backends._checkpoints import published_config
from proxytune.core.config import PRESETS
from proxytune.core.images import to_tensor
from proxytune.core.registry import STUDENTS
from tests.conftest import CPU, EXAMPLE

JANUS_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}
LUMINA_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "vqgan",
}
# name: (resolution, codes per image, codebook size, hub files the folder must hold)
TWINS = {
    "janus-pro-1b": (384, 576, 16384, JANUS_FILES),
    "janus-pro-7b": (384, 576, 16384, JANUS_FILES),
    "lumina-mgpt-7b-768": (768, 48 * 48, 8192, LUMINA_FILES),
}
# name: (the conditional prompt's first and last ids, the unconditional prompt, the block's first row)
LAYOUTS = {
    "janus-pro-1b": ([100000], [100016], [100000, 100015, 100016], 24 * [-1]),
    "janus-pro-7b": ([100000], [100016], [100000, 100015, 100016], 24 * [-1]),
    "lumina-mgpt-7b-768": ([0], [8710, 8197, 8828, 8828], [8197, 8828, 8828], [*48 * [-1], 8803]),
}
PAPER_RANK = PRESETS["paper"]["student"]["rank"]
# Sampling runs in bf16 where the CPU computes it natively (AVX-512, AMX), which halves what each
# step reads, as on a GPU; without it (AVX2) bf16 convolutions and matmuls run hundreds of times
# slower than fp32, so there the twins sample in fp32.
SAMPLING_DTYPE = (
    torch.bfloat16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else torch.float32
)


def saved_and_reloaded(registry, name: str, tmp_path_factory):
    """The one-layer twin of `name`, saved in its hub layout and loaded back from there."""
    built = registry.create(name)
    built.load(CPU, ModelSource(f"random:{name}"), layers=1)
    folder = tmp_path_factory.mktemp(name)
    for part in ("model", "pipe", "vqgan"):  # stored in bf16 like the published weights: half the disk
        if hasattr(built, part):
            getattr(built, part).to(dtype=torch.bfloat16)
    built.save(folder)
    del built
    backend = registry.create(name)
    backend.load(CPU, ModelSource(str(folder)))
    return backend, folder


@pytest.fixture(scope="module", params=sorted(TWINS))
def twin(request, tmp_path_factory):
    """(name, backend loaded back from the saved hub folder, the folder)."""
    backend, folder = saved_and_reloaded(STUDENTS, request.param, tmp_path_factory)
    yield request.param, backend, folder
    shutil.rmtree(folder)  # several GB each: CI disks are small


def lora_modules(model, pattern: str) -> list[str]:
    import re

    return [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(pattern, n)
    ]


def test_the_twin_is_the_published_architecture_in_the_hub_layout(twin):
    name, backend, folder = twin
    resolution, codes, codebook, files = TWINS[name]
    assert files <= {p.name for p in folder.iterdir()}
    assert (backend.resolution, backend.block.num_codes, backend.code_ids.numel()) == (
        resolution,
        codes,
        codebook,
    )
    assert backend.loaded_source == ModelSource(str(folder), None)


def test_lora_targets_and_the_paper_rank_trainable_parameters(twin):
    """Counts on the one-layer twin, then on the full-depth architecture built on the meta
    device, against the arithmetic from the published sizes (attention q/k/v/o)."""
    from peft import LoraConfig, get_peft_model

    name, backend, _ = twin
    pattern = backend.lora_target_modules
    assert len(lora_modules(backend.model, pattern)) == 4
    full = STUDENTS.create(name)
    full.load(torch.device("meta"), ModelSource(f"random:{name}"))
    text = published_config(name)["config"]
    text = text.get("text_config", text)
    hidden, layers = text["hidden_size"], text["num_hidden_layers"]
    assert len(lora_modules(full.model, pattern)) == 4 * layers
    peft_model = get_peft_model(full.model, LoraConfig(r=PAPER_RANK, target_modules=pattern))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    print(f"{name}: {trainable:,} trainable LoRA parameters at rank {PAPER_RANK}")
    assert trainable == layers * 4 * PAPER_RANK * (hidden + hidden)


def test_one_lora_training_step_lowers_the_loss_on_a_full_length_image(twin):
    from peft import LoraConfig, get_peft_model

    _, backend, _ = twin
    peft_model = get_peft_model(backend.model, LoraConfig(r=4, target_modules=backend.lora_target_modules))
    lora = [p for p in peft_model.parameters() if p.requires_grad]
    codes = torch.randint(0, backend.code_ids.numel(), (1, backend.block.num_codes))
    inputs = backend.tokenize(["a sks dog on the beach"], [False])
    optimizer = torch.optim.AdamW(lora, lr=1e-3)
    before = backend.nll(inputs, codes)
    before.backward()
    assert all(torch.isfinite(p.grad).all() for p in lora)
    assert any(p.grad.abs().sum() > 0 for p in lora)
    optimizer.step()
    with torch.no_grad():
        assert backend.nll(inputs, codes).item() < before.item()
    backend.model = peft_model.unload()


def test_prompts_and_image_blocks_have_the_reference_token_layout(twin):
    name, backend, _ = twin
    first, last, unconditional, row = LAYOUTS[name]
    prompt = backend.prompt_ids("a sks dog", unconditional=False)
    assert prompt[: len(first)] == first and prompt[-len(last) :] == last
    uncond = backend.prompt_ids("a sks dog", unconditional=True)
    assert [uncond[0], *sorted(set(uncond[1:-1])), uncond[-1]] == unconditional
    assert backend.block.template[: len(row)].tolist() == row


def test_full_length_sampling_draws_from_the_reference_distribution_and_decodes(twin, monkeypatch):
    """In `SAMPLING_DTYPE`."""
    name, _, folder = twin
    resolution, codes_per_image, codebook, _ = TWINS[name]
    backend = STUDENTS.create(name)
    backend.load(CPU, ModelSource(str(folder)))
    backend.model.to(SAMPLING_DTYPE)
    support = []
    original = ar.code_distribution

    def spy(cond, uncond, sampling):
        probs = original(cond, uncond, sampling)
        support.append((probs > 0).sum(-1))
        return probs

    monkeypatch.setattr(ar, "code_distribution", spy)
    codes = backend.sample_codes(["a sks dog on the beach"], [0])
    assert codes.shape == (1, codes_per_image) and codes.min() >= 0 and codes.max() < codebook
    assert len(support) == codes_per_image
    if backend.sampling.top_k:  # codes tied with the k-th logit stay, as in the reference's top-k
        assert all(
            backend.sampling.top_k <= s.min() and s.max() <= 1.01 * backend.sampling.top_k for s in support
        )
    else:
        assert all((s == codebook).all() for s in support)
    (image,) = backend.decode_images(codes)
    assert image.size == (resolution, resolution)


def reference_codes(latents: torch.Tensor, codebook: torch.Tensor, l2_norm: bool) -> torch.Tensor:
    """The reference tokenizers' rule, in float64: squared L2 distance to every code (after
    L2-normalising both sides where the tokenizer has `codebook_l2_norm`), argmin."""
    z = latents.double().permute(0, 2, 3, 1).flatten(1, 2)
    e = codebook.double()
    if l2_norm:
        z, e = z / z.norm(dim=-1, keepdim=True), e / e.norm(dim=-1, keepdim=True)
    return torch.cdist(z, e.expand(z.shape[0], -1, -1)).argmin(-1)


def test_vq_codes_follow_the_reference_tokenizer_in_fp32(twin):
    """Janus' tokenizer matches unit-normalised latents and codes (transformers' quantizer does
    not); every tokenizer's match is computed in fp32, since bf16 distances flip near-ties."""
    from PIL import Image

    name, backend, _ = twin
    resolution = TWINS[name][0]
    pixels = to_tensor([Image.open(EXAMPLE / "00.jpg")], resolution)
    with torch.no_grad():
        latents = backend.vq_latents(pixels)
    codebook = backend.codebook()
    expected = reference_codes(latents, codebook, backend.codebook_l2_norm)
    assert torch.equal(backend.encode_images(pixels), expected)
    if backend.codebook_l2_norm:
        raw = reference_codes(latents, codebook, l2_norm=False)
        assert (raw != expected).float().mean() > 0.5
    in_bf16 = reference_codes(
        latents.bfloat16().float(), codebook.bfloat16().float(), backend.codebook_l2_norm
    )
    half = nearest_codes(latents.bfloat16(), codebook.bfloat16(), backend.codebook_l2_norm)
    assert torch.equal(half, in_bf16)


# Supervisors: name -> (native resolution, LoRA-wrapped module suffixes that must be present;
# a one-block SD3 is its last block, which has no context output projection)
SUPERVISOR_TWINS = {
    "sd15": (512, {"to_q", "to_out.0"}),
    "sdxl": (1024, {"to_q", "to_out.0"}),
    "sd3": (1024, {"attn.to_q", "attn.add_k_proj"}),
    "sd3.5-large": (1024, {"attn.to_q", "attn.add_k_proj"}),
    "flux-dev": (1024, {"attn.to_q", "ff.net.2", "ff_context.net.2"}),
}


@pytest.fixture(scope="module", params=sorted(SUPERVISOR_TWINS))
def supervisor_twin(request, tmp_path_factory):
    """(name, pipeline loaded back from the saved diffusers folder, in `SAMPLING_DTYPE`, the folder)."""
    from proxytune.core.registry import SUPERVISORS

    backend, folder = saved_and_reloaded(SUPERVISORS, request.param, tmp_path_factory)
    backend.pipe.to(dtype=SAMPLING_DTYPE)
    yield request.param, backend, folder
    shutil.rmtree(folder)


def test_supervisor_twins_are_their_published_pipelines_in_the_diffusers_layout(supervisor_twin):
    name, backend, folder = supervisor_twin
    spec = published_config(name)
    layout = {p.name for p in folder.iterdir()}
    assert {"model_index.json", *spec["components"]} <= layout
    denoiser = spec["components"][backend.denoiser_name]["config"]
    for key in (
        "in_channels",
        "cross_attention_dim",
        "joint_attention_dim",
        "attention_head_dim",
        "block_out_channels",
    ):
        if key in denoiser:
            value = backend.denoiser.config[key]
            assert (list(value) if isinstance(value, tuple) else value) == denoiser[key], key
    assert backend.resolution == SUPERVISOR_TWINS[name][0]


def test_supervisor_twins_train_one_lora_step_at_native_size_and_round_trip(supervisor_twin, tmp_path):
    from proxytune.core.registry import SUPERVISORS

    name, backend, folder = supervisor_twin
    resolution, targets = SUPERVISOR_TWINS[name]
    vae = backend.pipe.vae
    size = resolution // (2 ** (len(vae.config.block_out_channels) - 1))
    latents = torch.randn(
        1, vae.config.latent_channels, size, size, generator=torch.Generator().manual_seed(0)
    )
    cond = backend.encode_prompts(["a sks dog on the beach"])
    parameters = backend.add_lora(4, 4.0)
    wrapped = {n.split(".lora_")[0] for n, p in backend.denoiser.named_parameters() if p.requires_grad}
    assert all(any(w.endswith(t) for w in wrapped) for t in targets)
    loss = backend.training_loss(latents, cond, torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad.abs().sum() > 0 for p in parameters)
    with torch.no_grad():
        for p in parameters:
            p.add_(0.01 * torch.randn_like(p))  # an adapter that is not a no-op
    backend.save_lora(str(tmp_path))
    reloaded = SUPERVISORS.create(name)
    reloaded.load(CPU, ModelSource(str(folder)))
    reloaded.load_lora(str(tmp_path))
    saved = {n: p for n, p in backend.denoiser.named_parameters() if p.requires_grad}
    loaded = {
        n.replace(".default_0.", ".default."): p
        for n, p in reloaded.denoiser.named_parameters()
        if ".lora_" in n
    }
    assert len(saved) == len(loaded)
    for key, value in saved.items():
        assert torch.allclose(loaded[key].float(), value.float(), atol=1e-6), key


def test_supervisor_twins_draw_one_image_at_native_resolution(supervisor_twin):
    name, backend, _ = supervisor_twin
    (image,) = backend.generate(["a sks dog on the beach"], [0], 1, backend.guidance_scale)
    assert image.size == (SUPERVISOR_TWINS[name][0],) * 2
