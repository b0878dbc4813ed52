import numpy as np
import pytest
import torch

from proxytune.backends._base import ModelSource
from proxytune.backends.janus import JanusStudent
from proxytune.contracts import read_adapter_card
from proxytune.proxy import load_proxy
from proxytune.registry import STUDENTS
from proxytune.storage import LocalStore
from proxytune.student import EVAL_SAMPLES, load_student, token_cache
from tests.conftest import CPU


@pytest.fixture(scope="module")
def janus():
    backend = STUDENTS.create("tiny-janus")
    backend.load(CPU)
    return backend


def cached_codes(backend, proxy_dir, store=None):
    info, records = load_proxy(proxy_dir)
    return token_cache(backend, backend.source, proxy_dir, info.key, records, store), records


def nll_on_cache(backend, proxy_dir):
    codes, records = cached_codes(backend, proxy_dir)
    held = min(EVAL_SAMPLES, len(records))
    with torch.no_grad():
        return backend.nll(
            backend.tokenize([r.prompt for r in records[:held]], [False] * held), codes[:held]
        ).item()


def test_tuning_lowers_nll_on_the_token_cache(student_dir, proxy_dir, janus):
    card = read_adapter_card(student_dir, "student")
    assert card.steps_done == 40
    assert card.eval_loss_after < card.eval_loss_before
    assert nll_on_cache(janus, proxy_dir) == pytest.approx(card.eval_loss_before, rel=1e-5)
    tuned, _ = load_student(student_dir, CPU)
    assert nll_on_cache(tuned, proxy_dir) == pytest.approx(card.eval_loss_after, rel=1e-4)


def test_student_adapter_files_follow_the_contract(student_dir, proxy_dir):
    card = read_adapter_card(student_dir, "student")
    info, _ = load_proxy(proxy_dir)
    assert {"adapter_model.safetensors", "adapter_config.json", "proxytune.json"} <= {
        p.name for p in student_dir.iterdir()
    }
    assert (card.backend, card.base_model.id, card.params["proxy_key"]) == (
        "tiny-janus",
        "tiny:janus",
        info.key,
    )


def test_token_cache_is_encoded_once_and_reused(proxy_dir, janus, tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    codes, records = cached_codes(janus, proxy_dir, store)
    assert codes.shape == (len(records), 16) and codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < 64
    assert len(store.list("token-cache/")) == 1

    def no_encoding(self, pixels):
        raise AssertionError("cached codes must not be encoded again")

    monkeypatch.setattr(JanusStudent, "encode_images", no_encoding)
    again, _ = cached_codes(janus, proxy_dir, store)
    assert torch.equal(codes, again)


def test_unconditional_prompts_keep_only_bos_and_begin_of_image(janus):
    tokenizer = janus.tokenizer
    inputs = janus.tokenize(["a sks dog", "a much longer prompt"], [True, False])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape == mask.shape and ids[:, -1].tolist() == [janus.boi_id] * 2
    uncond = ids[0][mask[0].bool()].tolist()
    assert uncond[0] == tokenizer.bos_token_id and uncond[-1] == janus.boi_id
    assert set(uncond[1:-1]) == {tokenizer.pad_token_id}
    assert mask[0, 0] == 0  # left padding keeps the image right after the prompt
    cond = ids[1][mask[1].bool()].tolist()
    assert tokenizer.decode(cond[1:-1]) == "<|User|>: a much longer prompt\n\n<|Assistant|>:"


def test_generation_is_seeded_and_decodes_to_images(student_dir):
    student, _ = load_student(student_dir, CPU)
    first = student.generate(["a sks dog", "a sks dog in the snow"], 5.0, seed=3)
    again = student.generate(["a sks dog", "a sks dog in the snow"], 5.0, seed=3)
    other = student.generate(["a sks dog", "a sks dog in the snow"], 5.0, seed=4)
    assert [im.size for im in first] == [(32, 32), (32, 32)]
    as_array = lambda images: np.stack([np.asarray(i) for i in images])  # noqa: E731
    assert np.array_equal(as_array(first), as_array(again))
    assert not np.array_equal(as_array(first), as_array(other))


def test_tiny_weights_are_the_same_on_every_build(janus):
    torch.manual_seed(12345)  # the global RNG state must not matter
    other = JanusStudent("tiny-janus", ModelSource("tiny:janus"))
    other.load(CPU)
    for (name, a), (_, b) in zip(
        janus.model.state_dict().items(), other.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
