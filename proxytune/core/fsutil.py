"""Atomic file and directory writes, and content hashes.

Every artifact proxytune writes goes through here so that an interrupted step never leaves
a half-written file or directory behind: data lands in a temporary sibling first and is
renamed into place (rename is atomic on POSIX file systems).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)
PROGRESS_MIN_BYTES = 64 << 20  # files below this download without a progress bar


@contextlib.contextmanager
def replacing(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary sibling of `path` to write; it replaces `path` only if the block succeeds.
    `suffix`: the temporary's, for writers that pick the format from it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_copy(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy a file (streamed, never whole in memory) so that `path` appears complete or not at all."""
    with replacing(path) as tmp:
        shutil.copyfile(source, tmp)


def resumable_download(
    path: str | os.PathLike, size: int, version: str, read_from: Callable[[int], Iterable[bytes]]
) -> None:
    """Stream `size` bytes to `path` in chunks, resuming a partial download of the same object
    `version` (an ETag) left by an interrupted run; `path` appears only when complete.

    `read_from(offset)` yields the object's bytes from `offset` on. The partial file is a
    hidden sibling named after the version, so a changed object never resumes a stale one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^0-9A-Za-z]", "", version)[:16]
    part = path.parent / f".{path.name}.{tag}.part"
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.part"):
        if stale != part:
            stale.unlink(missing_ok=True)
    offset = part.stat().st_size if part.is_file() else 0
    if offset > size:
        part.unlink()
        offset = 0
    if offset:
        log.info("resuming %s at %d of %d bytes", path.name, offset, size)
    with (
        open(part, "ab") as f,
        tqdm(
            total=size,
            initial=offset,
            unit="B",
            unit_scale=True,
            desc=path.name,
            disable=size < PROGRESS_MIN_BYTES,
            mininterval=2.0,
        ) as progress,
    ):
        for chunk in read_from(offset) if offset < size else ():
            f.write(chunk)
            progress.update(len(chunk))
        f.flush()
        os.fsync(f.fileno())
    if part.stat().st_size != size:
        raise OSError(f"{path.name}: downloaded {part.stat().st_size} of {size} bytes")
    os.chmod(part, 0o644)
    os.replace(part, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces `target` only if the block succeeds.

    `target` may not exist or may be an empty directory (KFP pre-creates some output
    paths); a non-empty `target` is refused so that nothing stored is overwritten.
    """
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} already exists and is not empty; refusing to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    tmp.chmod(0o755)
    try:
        yield tmp
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-serialisable object, independent of key order."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())
