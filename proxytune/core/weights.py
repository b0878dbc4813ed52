"""Stage model weights from an s3:// prefix (air-gapped clusters) into a local cache.

On a cluster the cache is the model-cache volume every GPU step mounts (`/cache/models`),
so weights are staged once per cluster, not once per pod or retry.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from proxytune.core.fsutil import sha256_bytes
from proxytune.core.storage import open_s3_uri

log = logging.getLogger(__name__)
CACHE_ENV = "PROXYTUNE_MODEL_CACHE"


def model_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV, "~/.cache/proxytune/models")).expanduser()


def stage_weights(uri: str) -> str:
    """Download `s3://bucket/prefix` once into the model cache; return the local folder.

    Files stream to disk in chunks (never whole in memory) into `<name>.partial/`; a run
    interrupted half-way (a pre-empted pod) keeps the files it finished and resumes the one
    it was writing. The folder is renamed into place only when complete, and a lock on the
    cache makes concurrent pods (proxy shards) wait for one download instead of racing."""
    cache = model_cache()
    name = sha256_bytes(uri.encode())[:16]
    target = cache / name
    if target.is_dir():
        return str(target)
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / f".{name}.lock"):
        if target.is_dir():  # another pod staged it while this one waited
            return str(target)
        store, prefix = open_s3_uri(uri)
        keys = store.list(prefix.rstrip("/") + "/")
        if not keys:
            raise FileNotFoundError(f"no weights under {uri}")
        partial = cache / f"{name}.partial"
        log.info("staging weights %s -> %s (%d files)", uri, target, len(keys))
        for key in keys:
            destination = partial / key[len(prefix.rstrip("/")) + 1 :]
            if not destination.is_file():
                store.get_file(key, destination)
        os.replace(partial, target)
    return str(target)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive POSIX lock (NFS-backed volumes honour it across nodes)."""
    with open(path, "a") as handle:
        fcntl.lockf(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)
