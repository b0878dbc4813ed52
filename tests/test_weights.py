import hashlib
import os
import tracemalloc
from pathlib import Path

import pytest

import proxytune.core.storage
from proxytune.backends._base import ModelSource
from proxytune.core.storage import MinioStore
from proxytune.core.weights import stage_weights

MB = 1 << 20


def random_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // (8 * MB)):
            chunk = os.urandom(8 * MB)
            f.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == []


def test_hub_ids_and_folders_pass_through():
    assert ModelSource("openai/clip-vit-base-patch32").local_or_hub() == "openai/clip-vit-base-patch32"
    assert not ModelSource("/models/sd15").is_tiny and ModelSource("tiny:sd").is_tiny


def test_staging_streams_a_300_mb_shard_with_bounded_memory(s3_env, tmp_path, monkeypatch):
    """Peak Python heap while staging stays at a few chunks; reading the object whole (what
    staging used to do) peaks at the object's size. tracemalloc counts every bytes buffer the
    download makes, and unlike RSS it does not depend on what else the machine is doing."""
    monkeypatch.setenv("PROXYTUNE_MODEL_CACHE", str(tmp_path / "cache"))
    size = 300 * MB
    digest = random_file(tmp_path / "shard.bin", size)
    store = MinioStore(s3_env, "models")
    store.put_file("big/shard.bin", tmp_path / "shard.bin")
    (tmp_path / "shard.bin").unlink()
    tracemalloc.start()
    try:
        folder = Path(stage_weights("s3://models/big"))
        staging = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        store.get_bytes("big/shard.bin")
        whole = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"peak heap: staging {staging / MB:.0f} MB, whole read {whole / MB:.0f} MB")
    assert staging < 48 * MB < size <= whole, (staging, whole)
    assert sha256(folder / "shard.bin") == digest


def test_an_interrupted_staging_resumes_where_it_stopped(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("PROXYTUNE_MODEL_CACHE", str(tmp_path / "cache"))
    store = MinioStore(s3_env, "models")
    digest = random_file(tmp_path / "b.bin", 40 * MB)
    store.put_file("model/b.bin", tmp_path / "b.bin")
    store.put_bytes("model/a.json", b"{}")
    read = MinioStore._read
    offsets = []

    def cut_after_two_chunks(self, key, offset=0):
        offsets.append((key, offset))
        for i, chunk in enumerate(read(self, key, offset)):
            if key.endswith("b.bin") and offset == 0 and i == 2:
                raise ConnectionResetError("the pod was pre-empted")
            yield chunk

    monkeypatch.setattr(MinioStore, "_read", cut_after_two_chunks)
    with pytest.raises(ConnectionResetError):
        stage_weights("s3://models/model")
    assert offsets == [("model/a.json", 0), ("model/b.bin", 0)]
    offsets.clear()
    folder = Path(stage_weights("s3://models/model"))
    assert offsets == [("model/b.bin", 2 * proxytune.core.storage.CHUNK)]  # a.json kept, b.bin resumed
    assert sha256(folder / "b.bin") == digest and (folder / "a.json").read_bytes() == b"{}"
    assert not list(folder.parent.glob("*.partial")) and not list(folder.rglob(".*.part"))
