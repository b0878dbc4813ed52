"""`proxytune gc`: what runs left behind goes; what re-runs reuse stays."""

import json
import os
import time

import pytest

from proxytune.cli import main
from proxytune.core.storage import LocalStore, MinioStore
from proxytune.ops.cleanup import DAY_S, collect_garbage
from proxytune.ops.runner import WorkdirBusy, workdir_lock

OLD = time.time() - 30 * DAY_S


def fill(store, prefix: str, complete: bool) -> None:
    store.put_bytes(f"{prefix}/shard-00000/000000.png", b"png")
    store.put_bytes(f"{prefix}/manifest.jsonl", b"{}\n")
    if complete:
        store.put_bytes(f"{prefix}/proxy.json", b"{}")


@pytest.fixture
def workdir(tmp_path):
    """A workdir as runs leave it: a killed run's tmp/, cache entries, proxy sets old and new."""
    (tmp_path / "runs" / "killed" / "tmp" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "done" / "logs").mkdir(parents=True)
    cache = tmp_path / "kfp-cache"
    cache.mkdir()
    kept = tmp_path / "pipeline-root" / "student"
    kept.mkdir(parents=True)
    artifact = {"__kfp_artifact__": True, "uri": str(kept)}
    (cache / "live.json").write_text(json.dumps({"student": artifact, "Output": 3}))
    gone = {"__kfp_artifact__": True, "uri": str(tmp_path / "pipeline-root" / "gone")}
    (cache / "stale.json").write_text(
        json.dumps({"parts": {"__kfp_artifact_list__": True, "artifacts": [gone]}})
    )
    store = LocalStore(tmp_path / "store")
    fill(store, "proxy/abandoned", complete=False)
    fill(store, "proxy/resumable", complete=False)
    fill(store, "proxy/finished", complete=True)
    for path in (tmp_path / "store" / "proxy").rglob("*"):
        if "resumable" not in str(path):
            os.utime(path, (OLD, OLD))
    return tmp_path


def test_gc_removes_what_nothing_reuses_and_keeps_the_rest(workdir, capsys):
    store = LocalStore(workdir / "store")
    listed = collect_garbage(workdir, store, dry_run=True)
    assert [(r.what, r.where) for r in listed] == [
        ("temporary files of a killed run", str(workdir / "runs" / "killed" / "tmp")),
        ("cache entry of missing artifacts", str(workdir / "kfp-cache" / "stale.json")),
        ("partial proxy set", f"{store.uri}/proxy/abandoned"),
    ]
    assert (workdir / "runs" / "killed" / "tmp").exists() and store.exists("proxy/abandoned/manifest.jsonl")

    assert main(["gc", "--workdir", str(workdir)]) == 0
    assert "removed 3 item(s)" in capsys.readouterr().out
    assert (
        not (workdir / "runs" / "killed" / "tmp").exists() and (workdir / "runs" / "done" / "logs").exists()
    )
    assert sorted(p.name for p in (workdir / "kfp-cache").iterdir()) == ["live.json"]
    assert {k.split("/")[1] for k in store.list("proxy/")} == {"resumable", "finished"}
    assert main(["gc", "--workdir", str(workdir), "--older-than", "0"]) == 0  # now the recent one too
    assert {k.split("/")[1] for k in store.list("proxy/")} == {"finished"}


def test_gc_waits_for_no_run_and_refuses_a_missing_workdir(workdir, tmp_path, capsys):
    with workdir_lock(workdir), pytest.raises(WorkdirBusy, match="in use by another proxytune run"):
        collect_garbage(workdir, LocalStore(workdir / "store"))
    assert main(["gc", "--workdir", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().out


@pytest.mark.servers
def test_gc_finds_partial_proxy_sets_on_s3_by_their_listing_dates(s3_env, tmp_path):
    store = MinioStore(s3_env, "gc-test")
    fill(store, "proxy/abandoned", complete=False)
    fill(store, "proxy/finished", complete=True)
    assert collect_garbage(tmp_path, store, older_than_s=3600) == []  # written just now: resumable
    (removal,) = collect_garbage(tmp_path, store, older_than_s=0)
    assert removal.where == "s3://gc-test/proxy/abandoned"
    assert store.list("proxy/") == [
        "proxy/finished/manifest.jsonl",
        "proxy/finished/proxy.json",
        "proxy/finished/shard-00000/000000.png",
    ]
