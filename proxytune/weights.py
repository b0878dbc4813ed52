"""Stage model weights from an s3:// prefix (air-gapped clusters) into a local cache."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from proxytune.fsutil import atomic_directory, sha256_bytes
from proxytune.storage import open_s3_uri

log = logging.getLogger(__name__)
CACHE_ENV = "PROXYTUNE_MODEL_CACHE"


def stage_weights(uri: str) -> str:
    """Download `s3://bucket/prefix` once into the model cache; return the local folder.

    The folder appears atomically, so a half-finished download is never mistaken for a
    complete one; a later call finds it and downloads nothing.
    """
    cache = Path(os.environ.get(CACHE_ENV, "~/.cache/proxytune/models")).expanduser()
    target = cache / sha256_bytes(uri.encode())[:16]
    if target.is_dir():
        return str(target)
    store, prefix = open_s3_uri(uri)
    log.info("staging weights %s -> %s", uri, target)
    with atomic_directory(target) as tmp:
        if not store.download_dir(prefix, tmp):
            raise FileNotFoundError(f"no weights under {uri}")
    return str(target)
