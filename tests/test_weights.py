from pathlib import Path

import pytest

from proxytune.backends._base import ModelSource
from proxytune.storage import MinioStore
from proxytune.weights import stage_weights


def test_weights_are_staged_from_s3_once(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("PROXYTUNE_MODEL_CACHE", str(tmp_path / "cache"))
    store = MinioStore(s3_env, "models")
    store.put_bytes("sd15/unet/config.json", b"{}")
    store.put_bytes("sd15/model_index.json", b'{"_class_name": "StableDiffusionPipeline"}')

    local = Path(ModelSource("s3://models/sd15").local_or_hub())
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == [
        "model_index.json",
        "unet/config.json",
    ]
    store.put_bytes("sd15/model_index.json", b"changed")
    assert stage_weights("s3://models/sd15") == str(local)  # cached: not downloaded again
    assert (local / "model_index.json").read_bytes() != b"changed"


def test_an_empty_prefix_is_an_error_and_leaves_no_cache(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("PROXYTUNE_MODEL_CACHE", str(tmp_path / "cache"))
    MinioStore(s3_env, "models")
    with pytest.raises(FileNotFoundError, match="no weights under s3://models/absent"):
        stage_weights("s3://models/absent")
    assert list((tmp_path / "cache").iterdir()) == []


def test_hub_ids_and_folders_pass_through():
    assert ModelSource("openai/clip-vit-base-patch32").local_or_hub() == "openai/clip-vit-base-patch32"
    assert not ModelSource("/models/sd15").is_tiny and ModelSource("tiny:sd").is_tiny
