import os

import pytest

from proxytune.core.fsutil import atomic_directory, atomic_write_text, sha256_json


def test_atomic_directory_appears_only_on_success(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("interrupted")
    assert not target.exists()
    assert os.listdir(tmp_path) == []

    with atomic_directory(target) as tmp:
        (tmp / "whole.txt").write_text("y")
    assert (target / "whole.txt").read_text() == "y"


def test_atomic_directory_fills_an_empty_placeholder_but_never_overwrites(tmp_path):
    (tmp_path / "empty").mkdir()
    with atomic_directory(tmp_path / "empty") as tmp:
        (tmp / "a").write_text("a")
    assert (tmp_path / "empty" / "a").exists()
    with pytest.raises(FileExistsError, match="not empty"), atomic_directory(tmp_path / "empty"):
        pass
    assert (tmp_path / "empty" / "a").read_text() == "a"


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_sha256_json_ignores_key_order():
    assert sha256_json({"a": 1, "b": [1, 2]}) == sha256_json({"b": [1, 2], "a": 1})
    assert sha256_json({"a": 1}) != sha256_json({"a": 2})
