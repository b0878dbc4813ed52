import numpy as np
import pytest
import torch
from PIL import Image

from proxytune.analysis.metrics import mean_paired_cosine, mean_pairwise_cosine
from proxytune.backends._base import pixel_batch
from proxytune.core.params import EvalParams
from proxytune.core.prompts import LIVE_PROMPTS, OBJECT_PROMPTS, dreambench_prompts, fill
from proxytune.stages.eval_score import Encoders, Features, References, load_encoder
from tests.conftest import CPU, EXAMPLE


def numpy_cosines(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def test_pairwise_and_paired_cosines_match_numpy():
    rng = np.random.default_rng(0)
    generated, references, texts = (
        rng.normal(size=(6, 12)),
        rng.normal(size=(4, 12)),
        rng.normal(size=(6, 12)),
    )
    t = lambda x: torch.from_numpy(x).float()  # noqa: E731
    assert mean_pairwise_cosine(t(generated), t(references)) == pytest.approx(
        numpy_cosines(generated, references).mean(), abs=1e-6
    )
    assert mean_paired_cosine(t(generated), t(texts)) == pytest.approx(
        np.diag(numpy_cosines(generated, texts)).mean(), abs=1e-6
    )
    with pytest.raises(ValueError, match="need one text per image"):
        mean_paired_cosine(t(generated), t(texts[:3]))


@pytest.fixture(scope="module")
def encoders(params):
    return Encoders.load(params.evaluation, CPU)


def test_identical_images_score_one_and_metrics_match_numpy_on_the_same_features(encoders):
    photo = Image.open(EXAMPLE / "00.jpg").convert("RGB")
    references = References.of(encoders, [photo, photo])
    same = Features.of(encoders, [photo] * 3, ["a dog"] * 3).scores(references)
    assert same["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert same["dino"] == pytest.approx(1.0, abs=1e-5)

    others = [Image.open(EXAMPLE / f"0{i}.jpg").convert("RGB") for i in (1, 2)]
    references = References.of(encoders, [photo, *others])
    features = Features.of(encoders, others, ["a dog on the beach", "a dog in the snow"])
    scores = features.scores(references)
    assert scores["clip_i"] == pytest.approx(
        numpy_cosines(features.clip.numpy(), references.clip.numpy()).mean(), abs=1e-6
    )
    assert scores["dino"] == pytest.approx(
        numpy_cosines(features.dino.numpy(), references.dino.numpy()).mean(), abs=1e-6
    )
    assert scores["clip_t"] == pytest.approx(
        np.diag(numpy_cosines(features.clip.numpy(), features.text.numpy())).mean(), abs=1e-6
    )
    assert scores["clip_i"] < 1.0


def test_encoder_features_are_unit_vectors(encoders):
    photo = Image.open(EXAMPLE / "00.jpg")
    for features in (
        encoders.clip.embed_images([photo]),
        encoders.dino.embed_images([photo]),
        encoders.clip.embed_texts(["x"]),
    ):
        assert torch.linalg.norm(features, dim=-1).item() == pytest.approx(1.0, abs=1e-5)


def test_encoders_saved_to_folders_load_back_through_their_sources(encoders, tmp_path):
    encoders.clip.save(tmp_path / "clip")
    encoders.dino.save(tmp_path / "dino")
    staged = Encoders.load(
        EvalParams(clip_source=str(tmp_path / "clip"), dino_source=str(tmp_path / "dino")), CPU
    )
    assert staged.describe() == {
        "clip": {"backend": "tiny-clip", "source": str(tmp_path / "clip"), "revision": "local"},
        "dino": {"backend": "tiny-dino", "source": str(tmp_path / "dino"), "revision": "local"},
    }
    photos = [Image.open(EXAMPLE / f"0{i}.jpg") for i in range(3)]
    texts = ["a dog in the jungle", "a dog wearing a red hat"]
    for original, loaded in (
        (encoders.clip.embed_images(photos), staged.clip.embed_images(photos)),
        (encoders.clip.embed_texts(texts), staged.clip.embed_texts(texts)),
        (encoders.dino.embed_images(photos), staged.dino.embed_images(photos)),
    ):
        np.testing.assert_allclose(loaded.numpy(), original.numpy(), atol=1e-6)


def test_an_encoder_from_the_hub_cache_records_its_commit(encoders, tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--proxytune--tiny-dino"
    encoders.dino.save(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # offline: the cache only
    dino = load_encoder("tiny-dino", "proxytune/tiny-dino", CPU)
    assert dino.describe() == {"backend": "tiny-dino", "source": "proxytune/tiny-dino", "revision": commit}
    photo = Image.open(EXAMPLE / "00.jpg")
    np.testing.assert_allclose(
        dino.embed_images([photo]).numpy(), encoders.dino.embed_images([photo]).numpy()
    )


def test_encoder_sources_that_are_not_there_fail_naming_the_encoder_and_source(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"tiny-clip: no folder '{tmp_path / 'clip'}'"):
        load_encoder("tiny-clip", str(tmp_path / "clip"), CPU)
    with pytest.raises(OSError, match="tiny-dino: cannot load weights from 'staged/dino'"):
        load_encoder("tiny-dino", "staged/dino", CPU)  # a relative folder not here reads as a hub id


def test_dino_preprocessing_resizes_the_short_side_then_center_crops():
    image = Image.new("RGB", (300, 200))
    image.paste((255, 0, 0), (0, 0, 150, 200))
    image.paste((0, 0, 255), (150, 0, 300, 200))
    batch = pixel_batch([image], resize=256, crop=224, mean=(0, 0, 0), std=(1, 1, 1))
    assert batch.shape == (1, 3, 224, 224)
    # 300x200 -> 384x256; the central 224 columns span 80..304, split at 192: 112 red, 112 blue.
    red = batch[0, 0, 100]
    assert (red[:110] > 0.9).all() and (red[114:] < 0.1).all()


def test_prompt_lists_follow_dreambench():
    assert dreambench_prompts("dog", 25) == list(LIVE_PROMPTS)
    assert dreambench_prompts("backpack", 3) == list(OBJECT_PROMPTS[:3])
    assert fill(LIVE_PROMPTS[10], "sks", "dog") == "a sks dog wearing a red hat"
    assert fill(LIVE_PROMPTS[10], None, "dog") == "a dog wearing a red hat"
    with pytest.raises(ValueError, match="between 1 and 25"):
        dreambench_prompts("dog", 26)
