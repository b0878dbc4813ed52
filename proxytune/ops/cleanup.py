"""`proxytune gc`: remove what runs left behind that nothing will reuse.

- `runs/<id>/tmp/` folders that a hard-killed run could not remove;
- kfp.local cache entries whose artifacts are gone (kfp.local would ignore them anyway);
- partial proxy sets in the object store (`proxy/<key>/` without `proxy.json`: drawing was
  interrupted and never finished) untouched for `older_than_s`: a recent one is kept, since
  the next run with the same supervisor and recipe resumes it.

Finished data (subjects, complete proxy sets, token caches, checkpoints, `pipeline-root/`) is
never touched: it is what re-runs reuse. The workdir's lock is held throughout, so no run can
be using what is removed.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from proxytune.core.contracts import PROXY_FILE
from proxytune.core.storage import ObjectStore, join
from proxytune.ops.runner import workdir_lock

DAY_S = 24 * 3600.0


@dataclass(frozen=True)
class Removal:
    what: str
    where: str


def collect_garbage(
    workdir: Path, store: ObjectStore, older_than_s: float = 7 * DAY_S, dry_run: bool = False
) -> list[Removal]:
    """Remove (or, `dry_run`, only list) what is described above; returns what it found."""
    with workdir_lock(workdir):
        found = [
            Removal("temporary files of a killed run", str(p)) for p in sorted(workdir.glob("runs/*/tmp"))
        ]
        found += [
            Removal("cache entry of missing artifacts", str(p))
            for p in sorted((workdir / "kfp-cache").glob("*.json"))
            if not all(Path(uri).exists() for uri in _artifact_uris(json.loads(p.read_text())))
        ]
        found += [
            Removal("partial proxy set", f"{store.uri}/{prefix}")
            for prefix in _abandoned_proxy_sets(store, time.time() - older_than_s)
        ]
        if not dry_run:
            for removal in found:
                _remove(removal, store)
    return found


def _artifact_uris(entry: object) -> list[str]:
    """The local artifact paths a kfp.local cache entry refers to."""
    if isinstance(entry, dict):
        if entry.get("__kfp_artifact__"):
            return [entry["uri"]]
        return [uri for value in entry.values() for uri in _artifact_uris(value)]
    if isinstance(entry, list):
        return [uri for value in entry for uri in _artifact_uris(value)]
    return []


def _abandoned_proxy_sets(store: ObjectStore, before: float) -> list[str]:
    """`proxy/<key>` prefixes without `proxy.json` whose newest object is older than `before`."""
    newest: dict[str, float] = {}
    complete: set[str] = set()
    for key, info in store.listing("proxy/").items():
        prefix = "/".join(key.split("/")[:2])
        newest[prefix] = max(newest.get(prefix, 0.0), info.modified)
        if key == join(prefix, PROXY_FILE):
            complete.add(prefix)
    return sorted(p for p, t in newest.items() if p not in complete and t < before)


def _remove(removal: Removal, store: ObjectStore) -> None:
    if removal.where.startswith(store.uri + "/"):
        store.delete_prefix(removal.where.removeprefix(store.uri + "/"))
    elif Path(removal.where).is_dir():
        shutil.rmtree(removal.where, ignore_errors=True)
    else:
        Path(removal.where).unlink(missing_ok=True)
