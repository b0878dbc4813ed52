import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import proxytune.backends._ar as ar
from proxytune.backends._ar import ARStudent
from proxytune.backends._base import ModelSource
from proxytune.backends._tuned import load_student
from proxytune.core.contracts import SubjectRef, read_adapter_card
from proxytune.core.params import EvalParams
from proxytune.core.registry import STUDENTS
from proxytune.core.storage import LocalStore
from proxytune.stages.proxy import load_proxy
from proxytune.stages.student import holdout_split, token_cache, tune_student
from tests.conftest import CPU


@pytest.fixture(scope="module")
def janus():
    backend = STUDENTS.create("tiny-janus")
    backend.load(CPU)
    return backend


def cached_codes(backend, proxy_dir, store=None):
    info, records = load_proxy(proxy_dir)
    return token_cache(backend, proxy_dir, info.key, records, store), records


def mean_nll(backend, proxy_dir, rows):
    codes, records = cached_codes(backend, proxy_dir)
    with torch.no_grad():
        inputs = backend.tokenize([records[i].prompt for i in rows], [False] * len(rows))
        return backend.nll(inputs, codes[list(rows)]).item()


def test_tuning_lowers_the_training_loss_and_the_card_carries_both_splits(student_dir, proxy_dir, janus):
    card = read_adapter_card(student_dir, "student")
    train, held = holdout_split(16, 0.1, "x")
    assert (card.steps_done, card.params["train_images"], card.params["heldout_images"]) == (40, 14, 2)
    assert card.loss_after["train"] < card.loss_before["train"]
    tuned, _ = load_student(student_dir, CPU)
    for split, rows in (("train", train), ("heldout", held)):
        assert mean_nll(janus, proxy_dir, rows) == pytest.approx(card.loss_before[split], rel=1e-5)
        assert mean_nll(tuned, proxy_dir, rows) == pytest.approx(card.loss_after[split], rel=1e-4)


def test_student_adapter_files_follow_the_contract(student_dir, proxy_dir):
    card = read_adapter_card(student_dir, "student")
    info, _ = load_proxy(proxy_dir)
    assert {"adapter_model.safetensors", "adapter_config.json", "proxytune.json"} <= {
        p.name for p in student_dir.iterdir()
    }
    assert (card.backend, card.base_model.id, card.params["proxy_keys"]) == (
        "tiny-janus",
        "random:tiny-janus",
        [info.key],
    )
    assert card.subjects == [SubjectRef(name="dog", identifier="sks", class_noun="dog")]


def test_heldout_images_are_never_trained_on_and_every_pass_is_micro_batched(
    proxy_dir, params, tmp_path, monkeypatch
):
    seen = {"train": [], "eval": []}
    original = ARStudent.nll

    def spy(self, inputs, batch_codes):
        seen["train" if torch.is_grad_enabled() else "eval"].append(batch_codes.clone())
        return original(self, inputs, batch_codes)

    monkeypatch.setattr(ARStudent, "nll", spy)
    student = params.student.model_copy(update={"steps": 6, "batch_size": 5, "micro_batch_size": 2})
    tune_student(proxy_dir, tmp_path / "student", student, device=CPU)

    backend = STUDENTS.create("tiny-janus")
    backend.load(CPU)
    codes, _ = cached_codes(backend, proxy_dir)
    held = {tuple(row.tolist()) for row in codes[-2:]}
    trained = {tuple(row.tolist()) for batch in seen["train"] for row in batch}
    evaluated = {tuple(row.tolist()) for batch in seen["eval"] for row in batch}
    assert trained and not trained & held
    assert held <= evaluated
    assert max(len(batch) for batch in seen["train"] + seen["eval"]) == 2
    assert len(seen["train"]) == 6 * 3  # 5 images per step in micro-batches of 2, 2, 1


def test_gradient_checkpointing_saves_less_for_backward_and_keeps_the_gradients():
    from peft import LoraConfig, get_peft_model

    backend = STUDENTS.create("tiny-janus")
    backend.load(CPU)
    peft_model = get_peft_model(backend.model, LoraConfig(r=4, target_modules=backend.lora_target_modules))
    lora = [p for p in peft_model.parameters() if p.requires_grad]
    inputs = backend.tokenize(["a sks dog", "a cat"], [False, True])
    codes = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))

    def gradients():
        saved = []  # bytes kept for backward outside checkpointed regions
        for p in lora:
            p.grad = None
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            loss = backend.nll(inputs, codes)
        loss.backward()
        return [p.grad.clone() for p in lora], sum(saved)

    backend.train_mode(gradient_checkpointing=False)
    plain, plain_bytes = gradients()
    backend.train_mode(gradient_checkpointing=True)
    checkpointed, checkpointed_bytes = gradients()
    assert checkpointed_bytes < plain_bytes / 2
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_a_dataset_too_small_to_hold_out_is_refused():
    assert holdout_split(10, 0.25, "x") == (range(7), range(7, 10))
    with pytest.raises(ValueError, match="1 proxy image"):
        holdout_split(1, 0.1, "proxy/")


def test_token_cache_is_encoded_once_and_reused(proxy_dir, janus, tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    codes, records = cached_codes(janus, proxy_dir, store)
    assert codes.shape == (len(records), 16) and codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < 64
    assert len(store.list("token-cache/")) == 1

    def no_encoding(self, pixels):
        raise AssertionError("cached codes must not be encoded again")

    monkeypatch.setattr(type(janus), "encode_images", no_encoding)
    again, _ = cached_codes(janus, proxy_dir, store)
    assert torch.equal(codes, again)


def test_a_new_encoding_never_reuses_old_token_caches(proxy_dir, janus, tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    monkeypatch.setattr(janus, "encoding", "an-older-encoding")
    cached_codes(janus, proxy_dir, store)
    monkeypatch.undo()
    cached_codes(janus, proxy_dir, store)
    assert len(store.list("token-cache/")) == 2


def test_unconditional_prompts_keep_only_bos_and_begin_of_image(janus):
    tokenizer = janus.tokenizer
    inputs = janus.tokenize(["a sks dog", "a much longer prompt"], [True, False])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape == mask.shape and ids[:, -1].tolist() == [janus.boi_id] * 2
    uncond = ids[0][mask[0].bool()].tolist()
    assert uncond[0] == tokenizer.bos_token_id and uncond[-1] == janus.boi_id
    assert set(uncond[1:-1]) == {tokenizer.convert_tokens_to_ids("<｜▁pad▁｜>")}
    assert mask[0, 0] == 0  # left padding keeps the image right after the prompt
    cond = ids[1][mask[1].bool()].tolist()
    assert tokenizer.decode(cond[1:-1]) == "<|User|>: a much longer prompt\n\n<|Assistant|>:"


def test_the_chunked_loss_equals_one_cross_entropy_over_the_block(janus, monkeypatch):
    codes = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    inputs = janus.tokenize(["a", "a sks dog", "b"], [False, False, True])
    monkeypatch.setattr(ar, "LOSS_CHUNK", 5)
    with torch.no_grad():
        chunked = janus.nll(inputs, codes)
        model = janus.model
        text = model.get_input_embeddings()(inputs["input_ids"])
        image = model.prepare_embeddings_for_image_generation(codes[:, :-1])
        mask = torch.cat([inputs["attention_mask"], torch.ones(3, 15, dtype=torch.long)], 1)
        hidden = model.model.language_model(
            inputs_embeds=torch.cat([text, image], 1),
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        ).last_hidden_state
        logits = model.model.generation_head(hidden[:, inputs["input_ids"].shape[1] - 1 :])
    reference = F.cross_entropy(logits.flatten(0, 1), codes.flatten())
    assert chunked.item() == pytest.approx(reference.item(), rel=1e-5)


def test_fast_sampling_equals_the_reference_loop_and_ignores_batch_neighbours(janus):
    sampling = janus.sampling.override(top_k=20, top_p=0.95, temperature=0.9)
    prompts, seeds = ["a sks dog", "a cat on a long road", "x"], [5, 6, 7]
    fast = janus.sample_codes(prompts, seeds, sampling, batch_size=2)
    for i in range(3):
        assert torch.equal(fast[i], janus.reference_codes(prompts[i], seeds[i], sampling)[0])
    assert torch.equal(janus.sample_codes(prompts[1:2], seeds[1:2], sampling)[0], fast[1])
    assert not torch.equal(janus.sample_codes(prompts[1:2], [8], sampling)[0], fast[1])


def test_guidance_one_samples_the_conditional_model_only(student_dir):
    student, _ = load_student(student_dir, CPU)
    sampling = student.sampling.override(
        **EvalParams(student_sampling={"guidance_scale": 1.0}).student_sampling
    )
    images = student.generate(["a sks dog", "a sks dog"], [1, 2], sampling)
    assert [im.size for im in images] == [(32, 32)] * 2
    codes = student.sample_codes(["a sks dog"], [1], sampling)
    assert torch.equal(codes, student.reference_codes("a sks dog", 1, sampling))


def test_generation_is_seeded_and_decodes_to_images(student_dir):
    student, _ = load_student(student_dir, CPU)
    prompts = ["a sks dog", "a sks dog in the snow"]
    first, again, other = (student.generate(prompts, seeds) for seeds in ([3, 4], [3, 4], [5, 6]))
    assert [im.size for im in first] == [(32, 32), (32, 32)]
    as_array = lambda images: np.stack([np.asarray(i) for i in images])  # noqa: E731
    assert np.array_equal(as_array(first), as_array(again))
    assert not np.array_equal(as_array(first), as_array(other))


def test_tiny_weights_are_the_same_on_every_build(janus):
    torch.manual_seed(12345)  # the global RNG state must not matter
    other = STUDENTS.create("tiny-janus")
    other.load(CPU)
    for (name, a), (_, b) in zip(
        janus.model.state_dict().items(), other.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def hub_cache(root, repo: str, commit: str, folder):
    """Lay `folder` out as the Hugging Face cache holds a download of `repo` at `commit`."""
    base = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, base / "snapshots" / commit)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)


def test_hub_checkpoints_load_offline_and_record_their_commit(janus, tmp_path, monkeypatch):
    janus.save(tmp_path / "saved")
    commit = "0123456789abcdef0123456789abcdef01234567"
    hub_cache(tmp_path / "hub", "someone/tiny-janus", commit, tmp_path / "saved")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    backend = STUDENTS.create("tiny-janus")
    backend.load(CPU, ModelSource("someone/tiny-janus"))
    assert backend.loaded_source == ModelSource("someone/tiny-janus", commit)
    for (name, a), (_, b) in zip(
        janus.model.state_dict().items(), backend.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_a_checkpoint_missing_weights_is_refused(janus, tmp_path):
    from safetensors.torch import load_file, save_file

    janus.save(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.generation_head.vision_head.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 weight"):
        STUDENTS.create("tiny-janus").load(CPU, ModelSource(str(tmp_path)))


def test_special_tokens_that_disagree_with_the_generation_config_are_refused(janus, tmp_path):
    janus.save(tmp_path)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    generation["generation_kwargs"]["boi_token_id"] = 260
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    with pytest.raises(ValueError, match="boi_token_id: tokenizer 259 vs generation_config 260"):
        STUDENTS.create("tiny-janus").load(CPU, ModelSource(str(tmp_path)))


@pytest.fixture(scope="module")
def second_proxy_dir(params, tmp_path_factory):
    """A second subject (mirrored dog photos, identifier ohwx) through supervisor and proxy."""
    from PIL import Image, ImageOps

    from proxytune.stages.ingest import ingest
    from proxytune.stages.proxy import generate_proxy
    from proxytune.stages.supervisor import tune_supervisor
    from tests.conftest import EXAMPLE

    root = tmp_path_factory.mktemp("second")
    (root / "photos").mkdir()
    for source in sorted(EXAMPLE.glob("*.jpg")):
        ImageOps.mirror(Image.open(source)).save(root / "photos" / f"{source.stem}.png")
    ingest(str(root / "photos"), root / "subject", "dog", name="dog2", identifier="ohwx")
    tune_supervisor(
        root / "subject", root / "supervisor", params.supervisor.model_copy(update={"steps": 5}), device=CPU
    )
    proxy = params.proxy.model_copy(update={"num_images": 8})
    generate_proxy(root / "supervisor", root / "proxy", proxy, device=CPU)
    return root / "proxy"


def test_one_student_learns_several_subjects_each_by_its_identifier(
    proxy_dir, second_proxy_dir, params, tmp_path, monkeypatch
):
    prompts = []
    original = ARStudent.tokenize

    def spy(self, batch, unconditional):
        prompts.extend(batch)
        return original(self, batch, unconditional)

    monkeypatch.setattr(ARStudent, "tokenize", spy)
    student = params.student.model_copy(update={"steps": 8})
    card = tune_student([proxy_dir, second_proxy_dir], tmp_path / "joint", student, device=CPU)
    assert [(s.name, s.identifier) for s in card.subjects] == [("dog", "sks"), ("dog2", "ohwx")]
    assert (card.params["train_images"], card.params["heldout_images"]) == (14 + 7, 2 + 1)
    assert len(card.params["proxy_keys"]) == 2
    assert {"a sks dog", "a ohwx dog"} <= set(prompts)


def test_subjects_sharing_an_identifier_cannot_train_one_student(proxy_dir, params, tmp_path):
    with pytest.raises(ValueError, match="one identifier per subject"):
        tune_student([proxy_dir, proxy_dir], tmp_path / "joint", params.student, device=CPU)


def test_prompt_batches_pad_to_a_fixed_multiple_so_neighbours_rarely_matter(janus):
    short = janus.tokenize(["a"], [False])["attention_mask"]
    mixed = janus.tokenize(["a", "a somewhat longer prompt"], [False, False])["attention_mask"]
    assert short.shape[1] % 64 == 0 and mixed.shape[1] == short.shape[1]
    assert torch.equal(mixed[0], short[0])


def test_transparent_proxy_images_are_encoded_as_on_white():
    from PIL import Image

    from proxytune.core.images import to_tensor

    clear = Image.new("RGBA", (8, 8), (10, 200, 30, 0))
    assert torch.equal(to_tensor([clear], 8), torch.ones(1, 3, 8, 8))
