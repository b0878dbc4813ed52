"""Object store: one small interface, a local-folder and a MinIO/S3 implementation.

Endpoint and keys come only from the environment (a Kubernetes Secret on the cluster):

- `PROXYTUNE_S3_ENDPOINT_URL` (e.g. `http://minio.proxytune:9000`): when set, the store is
  MinIO/S3 through the `minio` SDK, bucket `PROXYTUNE_S3_BUCKET` (default `proxytune`), keys
  `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (the names MLflow's S3 client reads too);
- otherwise a local folder, `PROXYTUNE_STORE_DIR` (default `~/.cache/proxytune/store`).

Keys are `/`-separated paths. Datasets are stored under content-addressed prefixes
(`subjects/<sha256>/`, `proxy/<sha256>/`, `token-cache/<sha256>/`) so re-runs reuse them.
"""

from __future__ import annotations

import io
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from proxytune.core.fsutil import atomic_copy, atomic_write_bytes, resumable_download

ENDPOINT_ENV = "PROXYTUNE_S3_ENDPOINT_URL"
BUCKET_ENV = "PROXYTUNE_S3_BUCKET"
STORE_DIR_ENV = "PROXYTUNE_STORE_DIR"
DEFAULT_BUCKET = "proxytune"
CHUNK = 8 << 20


@dataclass(frozen=True)
class ObjectInfo:
    size: int  # bytes
    modified: float  # Unix seconds


class ObjectStore(ABC):
    """A flat key -> bytes store with directory helpers."""

    uri: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """All keys under `prefix` (recursive), sorted."""

    @abstractmethod
    def listing(self, prefix: str, recursive: bool = True) -> dict[str, ObjectInfo]:
        """Every key under `prefix` (or only directly in it) with its size and modification
        time, from the listing alone: nothing is downloaded."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object; removing an absent one is not an error."""

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix.rstrip("/") + "/"):
            self.delete(key)

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike) -> None:
        """Upload a file, streamed (model shards are several GB)."""

    @abstractmethod
    def get_file(self, key: str, path: str | os.PathLike) -> None:
        """Download to `path`, streamed in chunks; `path` appears only when complete."""

    def upload_dir(self, local_dir: str | os.PathLike, prefix: str, skip: set[str] | None = None) -> None:
        """Upload every file under `local_dir` to `prefix/<relative path>` (except `skip`)."""
        local_dir = Path(local_dir)
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            if not skip or rel not in skip:
                self.put_file(join(prefix, rel), path)

    def download_dir(self, prefix: str, local_dir: str | os.PathLike) -> list[str]:
        """Download every key under `prefix` into `local_dir`; return the relative paths."""
        prefix = prefix.rstrip("/") + "/"
        relative = []
        for key in self.list(prefix):
            rel = key[len(prefix) :]
            self.get_file(key, Path(local_dir) / rel)
            relative.append(rel)
        return relative


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


class LocalStore(ObjectStore):
    """A folder on disk; writes are atomic (temp file + rename)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        path = (self.root / key.lstrip("/")).resolve()
        if self.root not in path.parents and path != self.root:
            raise ValueError(f"key {key!r} escapes the store root")
        return path

    def put_bytes(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self._path(key), data)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{self.uri}: no object {key!r}")
        return path.read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        atomic_copy(path, self._path(key))

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        source = self._path(key)
        if not source.is_file():
            raise FileNotFoundError(f"{self.uri}: no object {key!r}")
        atomic_copy(source, path)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix.strip("/") else self.root
        if base.is_file():
            return [prefix.strip("/")]
        if not base.is_dir():
            return []
        keys = [
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        ]
        return sorted(k for k in keys if k.startswith(prefix.lstrip("/")))

    def listing(self, prefix: str, recursive: bool = True) -> dict[str, ObjectInfo]:
        depth = prefix.strip("/").count("/") + 1 if prefix.strip("/") else 0
        keys = [k for k in self.list(prefix) if recursive or k.count("/") == depth]
        return {k: ObjectInfo(self._path(k).stat().st_size, self._path(k).stat().st_mtime) for k in keys}


class MinioStore(ObjectStore):
    """A bucket (and optional key prefix) on MinIO or any S3-protocol server."""

    def __init__(self, endpoint_url: str, bucket: str, prefix: str = "", create_bucket: bool = True):
        from minio import Minio

        parsed = urlparse(endpoint_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"{ENDPOINT_ENV} must look like http(s)://host:port, got {endpoint_url!r}")
        access_key = os.environ.get("AWS_ACCESS_KEY_ID")
        secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY")
        if not access_key or not secret_key:
            raise ValueError(
                "the S3 store needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"
            )
        self.client = Minio(
            parsed.netloc,
            access_key=access_key,
            secret_key=secret_key,
            secure=parsed.scheme == "https",
            region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        )
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{join(bucket, self.prefix)}"
        if create_bucket and not self.client.bucket_exists(bucket):
            self.client.make_bucket(bucket)

    def __repr__(self) -> str:
        return f"MinioStore({self.uri})"

    def _key(self, key: str) -> str:
        return join(self.prefix, key)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(self.bucket, self._key(key), io.BytesIO(data), length=len(data))

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self._read(key))

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        self.client.fput_object(self.bucket, self._key(key), str(path))

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        """Streamed in `CHUNK`s; an interrupted download of the same object version resumes."""
        from minio.error import S3Error

        try:
            stat = self.client.stat_object(self.bucket, self._key(key))
        except S3Error as error:
            if error.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
                raise FileNotFoundError(f"{self.uri}: no object {key!r}") from error
            raise
        resumable_download(path, stat.size, stat.etag, lambda offset: self._read(key, offset))

    def _read(self, key: str, offset: int = 0) -> Iterator[bytes]:
        from minio.error import S3Error

        try:
            response = self.client.get_object(self.bucket, self._key(key), offset=offset)
        except S3Error as error:
            if error.code in ("NoSuchKey", "NoSuchBucket"):
                raise FileNotFoundError(f"{self.uri}: no object {key!r}") from error
            raise
        try:
            yield from response.stream(CHUNK)
        finally:
            response.close()
            response.release_conn()

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        try:
            self.client.stat_object(self.bucket, self._key(key))
        except S3Error as error:
            if error.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, self._key(key))

    def list(self, prefix: str) -> list[str]:
        return sorted(self.listing(prefix))

    def listing(self, prefix: str, recursive: bool = True) -> dict[str, ObjectInfo]:
        full = self._key(prefix) + ("/" if prefix.endswith("/") else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        objects = self.client.list_objects(self.bucket, prefix=full, recursive=recursive)
        return {
            o.object_name[strip:]: ObjectInfo(o.size, o.last_modified.timestamp())
            for o in objects
            if not o.is_dir
        }


def store_from_env() -> ObjectStore:
    """The platform's store: MinIO when the endpoint variable is set, else a local folder."""
    endpoint = os.environ.get(ENDPOINT_ENV)
    if endpoint:
        return MinioStore(endpoint, os.environ.get(BUCKET_ENV, DEFAULT_BUCKET))
    return LocalStore(os.environ.get(STORE_DIR_ENV, "~/.cache/proxytune/store"))


def open_s3_uri(uri: str) -> tuple[MinioStore, str]:
    """`s3://bucket/prefix` -> (store on that bucket, key prefix inside it)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{uri!r} is not an s3://bucket/prefix location")
    endpoint = os.environ.get(ENDPOINT_ENV)
    if not endpoint:
        raise ValueError(f"{uri} is an s3:// location but {ENDPOINT_ENV} is not set")
    return MinioStore(endpoint, parsed.netloc, create_bucket=False), parsed.path.strip("/")
