"""Every supervisor family on its tiny twin: training lowers the loss, only the LoRA layers of
the targeted modules train, the saved adapter reproduces the tuned pipeline, and the stages
run end to end (tune_supervisor, then proxy generation)."""

import re

import numpy as np
import pytest
import torch

from proxytune.backends._diffusion import repeat
from proxytune.core.contracts import read_adapter_card
from proxytune.core.registry import SUPERVISORS
from proxytune.core.tracking import Tracker
from proxytune.stages.proxy import generate_proxy, load_proxy
from proxytune.stages.supervisor import tune_supervisor
from proxytune.stages.training import fixed_loss, train_lora
from tests.conftest import CPU

FAMILIES = ["tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux"]


def draws(backend, latents, cond):
    return lambda g: iter([(backend.training_loss(latents, repeat(cond, latents.shape[0]), g), 1.0)])


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_training_lowers_the_loss_and_touches_only_the_targeted_modules(name):
    backend = SUPERVISORS.create(name)
    backend.load(CPU)
    pixels = torch.rand(
        2, 3, backend.resolution, backend.resolution, generator=torch.Generator().manual_seed(0)
    )
    latents = backend.encode_images(pixels * 2 - 1)
    cond = backend.encode_prompts(["a sks dog"])
    frozen = {k: v.clone() for k, v in backend.denoiser.state_dict().items()}
    before = fixed_loss(draws(backend, latents, cond), range(6))
    parameters = backend.add_lora(4, 4.0)
    train_lora(
        parameters,
        draws(backend, latents, cond),
        steps=25,
        learning_rate=3e-2,
        max_grad_norm=1.0,
        seed=0,
        tracker=Tracker(),
        desc=name,
    )
    after = fixed_loss(draws(backend, latents, cond), range(6))
    assert after < before
    trained = {n for n, p in backend.denoiser.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    wrapped = {n.split(".lora_")[0] for n in trained}
    assert all(
        re.search(r"(^|\.)(" + "|".join(map(re.escape, backend.lora_targets)) + r")$", w) for w in wrapped
    )
    state = backend.denoiser.state_dict()
    for key, value in frozen.items():
        live = (
            state.get(key)
            if key in state
            else state[key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")]
        )
        assert torch.equal(live, value), key


@pytest.mark.parametrize("name", FAMILIES)
def test_the_saved_adapter_reproduces_the_tuned_pipeline(name, tmp_path):
    backend = SUPERVISORS.create(name)
    backend.load(CPU)
    latents = backend.encode_images(torch.rand(2, 3, backend.resolution, backend.resolution) * 2 - 1)
    cond = backend.encode_prompts(["a sks dog"])
    train_lora(
        backend.add_lora(4, 4.0),
        draws(backend, latents, cond),
        steps=3,
        learning_rate=5e-2,
        max_grad_norm=1.0,
        seed=0,
        tracker=Tracker(),
        desc=name,
    )
    backend.save_lora(str(tmp_path))
    tuned = backend.generate(["a sks dog"], [7], 3, backend.guidance_scale)
    reloaded = SUPERVISORS.create(name)
    reloaded.load(CPU)
    untuned = reloaded.generate(["a sks dog"], [7], 3, reloaded.guidance_scale)
    reloaded.load_lora(str(tmp_path))
    again = reloaded.generate(["a sks dog"], [7], 3, reloaded.guidance_scale)
    as_array = lambda images: np.stack([np.asarray(i, dtype=np.int16) for i in images])  # noqa: E731
    assert np.array_equal(as_array(tuned), as_array(again))
    assert not np.array_equal(as_array(tuned), as_array(untuned))
    reloaded.fuse_lora()
    fused = reloaded.generate(["a sks dog"], [7], 3, reloaded.guidance_scale)
    assert np.abs(as_array(fused) - as_array(tuned)).max() <= 2  # merged weights: rounding only


@pytest.mark.parametrize("name", FAMILIES[1:])
def test_each_family_runs_through_the_supervisor_and_proxy_stages(name, subject_dir, params, tmp_path):
    settings = params.supervisor.model_copy(update={"backend": name, "steps": 4})
    card = tune_supervisor(subject_dir, tmp_path / "supervisor", settings, device=CPU)
    assert (card.backend, card.steps_done, card.params["resolution"]) == (name, 4, 64)
    assert card.params["learning_rate"] == SUPERVISORS.create(name).recipe.learning_rate
    assert read_adapter_card(tmp_path / "supervisor", "supervisor").adapter_files[0].endswith(".safetensors")
    proxy = params.proxy.model_copy(update={"num_images": 2, "inference_steps": 2})
    info = generate_proxy(tmp_path / "supervisor", tmp_path / "proxy", proxy, device=CPU)
    _, records = load_proxy(tmp_path / "proxy")
    assert info.params["guidance_scale"] == SUPERVISORS.create(name).guidance_scale
    assert [r.seed for r in records] == [0, 1]
