"""`proxytune run --local`: the same KFP pipeline on this machine through `kfp.local`.

Embedded defaults, each overridable by the environment:
- MLflow: `sqlite:///<workdir>/mlflow.db` (artifacts in `<workdir>/mlartifacts`) unless
  `MLFLOW_TRACKING_URI` is set;
- object store: `<workdir>/store` unless `PROXYTUNE_S3_ENDPOINT_URL` (MinIO/S3) or
  `PROXYTUNE_STORE_DIR` is set.
Tasks run as subprocesses of this interpreter (`SubprocessRunner(use_venv=False)`), so
the installed project is what runs; nothing is pip-installed at run time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import proxytune
from proxytune.core.config import RunParams
from proxytune.core.fsutil import atomic_write_json, read_json
from proxytune.core.storage import BUCKET_ENV, ENDPOINT_ENV, STORE_DIR_ENV, ObjectStore, store_from_env
from proxytune.ops.runconfig import RunConfig, validate_run_config
from proxytune.stages.ingest import scan_subject
from proxytune.stages.proxy_import import check_proxy_import

log = logging.getLogger(__name__)
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # kfp.local colours its messages
REPO_ROOT = Path(proxytune.__file__).resolve().parents[1]  # the checkout (or site-packages) holding it
EXAMPLE_SUBJECT = REPO_ROOT / "examples" / "subjects" / "dog"
EXAMPLE_CLASS = "dog"


@contextlib.contextmanager
def _environment(defaults: dict[str, str]) -> Iterator[None]:
    """Set variables that are not set yet (inherited by the task subprocesses), then restore."""
    added = {k: v for k, v in defaults.items() if not os.environ.get(k)}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _absolute(uri: str) -> str:
    return uri if uri.startswith("s3://") else str(Path(uri).expanduser().resolve())


def workdir_store(workdir: Path) -> ObjectStore:
    """The object store a local run on `workdir` uses (S3 when the endpoint is set)."""
    with _environment(local_defaults(workdir)):
        return store_from_env()


def local_defaults(workdir: Path) -> dict[str, str]:
    defaults = {"MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    if not os.environ.get(ENDPOINT_ENV):
        defaults[STORE_DIR_ENV] = str(workdir / "store")
    return defaults


@contextlib.contextmanager
def _local_kfp(workdir: Path, reuse: bool = True) -> Iterator[str]:
    """kfp.local set up on `workdir` with the embedded defaults; yields the MLflow URI.

    `reuse`: kfp.local's task cache (`<workdir>/kfp-cache`) serves a step whose inputs,
    parameters and code (`source_digest`, in every task's environment) match a finished one,
    so a re-run redoes only what changed; `register` always runs."""
    from kfp import local

    with _environment(local_defaults(workdir)):
        local.init(
            runner=local.SubprocessRunner(use_venv=False),
            pipeline_root=str(workdir / "pipeline-root"),
            enable_caching=reuse,
            cache_root=str(workdir / "kfp-cache"),
        )
        yield os.environ["MLFLOW_TRACKING_URI"]


def run_identity() -> str:
    """What a cached step's outputs depend on beyond its inputs and parameters: the code
    (`source_digest`) and where it tracked and stored (the MLflow URI, the S3 endpoint and
    bucket), so a run against another server or store does its steps there again."""
    places = [os.environ.get(k, "") for k in ("MLFLOW_TRACKING_URI", ENDPOINT_ENV, BUCKET_ENV, STORE_DIR_ENV)]
    return f"{source_digest()}-{hashlib.sha256(json.dumps(places).encode()).hexdigest()[:8]}"


def source_digest() -> str:
    """A digest of the installed proxytune, components and pipelines sources and backend
    configs: what made a cached step output, so changed code never reuses old outputs."""
    digest = hashlib.sha256()
    for package in ("proxytune", "components", "pipelines"):
        for path in sorted((REPO_ROOT / package).rglob("*")):
            if path.suffix in (".py", ".json") and path.is_file():
                digest.update(f"{path.relative_to(REPO_ROOT)}\0".encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def check_run(config: RunConfig) -> None:
    """Every subject's photos and proxy import checked against the run's `ingest` limits (each
    file decoded once), before any task starts or anything is written; raises ValueError
    (IngestError) naming the file and the limit."""
    limits = RunParams.resolve(config.preset, config.overrides).ingest
    for subject in config.pipeline_subjects():
        scan_subject(subject["uri"], limits)
        if subject["proxy_uri"]:
            check_proxy_import(subject["proxy_uri"], subject["identifier"], limits)


def run_local(
    subjects: list[dict[str, str]],
    workdir: str | Path,
    preset: str = "tiny",
    overrides: dict[str, Any] | None = None,
    experiment: str = "proxytune",
    registered_model_name: str = "",
    run_dir: str | Path | None = None,
    fresh: bool = False,
    checked: bool = False,
) -> dict[str, Any]:
    """Validate the inputs, run the pipeline, write and return `summary.json` (and copy the
    report) into `run_dir` (default: `workdir`).

    `subjects`: one dict per subject, `uri` and `class_noun`, optional `name`, `identifier`
    and `proxy_uri` (import the proxy images from there); several make a multi-subject
    student. Bad inputs (photos and proxy imports included) raise ValueError before any task
    starts (`checked`: the caller ran `check_run` already); a failed task gives a summary with
    status "failed" (and RuntimeError from kfp). Finished steps are reused unless `fresh`."""
    from pipelines.proxy_tuning import build
    from proxytune.analysis.report import random_note
    from proxytune.stages.evaluate import read_evaluation

    workdir = Path(workdir).resolve()
    run_dir = Path(run_dir or workdir)
    config = validate_run_config(
        {
            "subjects": [
                {**s, **{k: _absolute(s[k]) for k in ("uri", "proxy_uri") if s.get(k)}} for s in subjects
            ],
            "preset": preset,
            "overrides": overrides or {},
            "experiment": experiment,
            "registered_model_name": registered_model_name,
        }
    )
    if not checked:
        check_run(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "status": "running",
        "workdir": str(workdir),
        "subject_uris": [p["uri"] for p in config.pipeline_subjects()],
    }
    started = time.monotonic()
    with _local_kfp(workdir, reuse=not fresh) as tracking_uri:
        try:
            task = build(parallelism=1, local_code=run_identity())(**config.pipeline_arguments())
        except RuntimeError as error:
            cause = ANSI.sub("", str(error))
            summary.update(status="failed", error=cause, seconds=round(time.monotonic() - started, 1))
            atomic_write_json(run_dir / "summary.json", summary)
            raise
    registration = json.loads(task.outputs["registration"])
    report = run_dir / "report.html"
    shutil.copyfile(task.outputs["report"].path, report)
    note = random_note(read_evaluation(task.outputs["samples"].path))
    summary.update(
        status="succeeded",
        seconds=round(time.monotonic() - started, 1),
        metrics=registration["metrics"],
        report=str(report),
        student_adapter=task.outputs["student"].path,
        mlflow={
            "tracking_uri": tracking_uri,
            "experiment": experiment,
            "parent_run_id": registration["parent_run_id"],
        },
        registered_model={
            "name": registration["name"],
            "version": registration["version"],
            "aliases": registration["aliases"],
            "gate": registration["gate_reason"],
        },
        **({"note": note} if note else {}),
    )
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def run_bench(
    dataset_uri: str,
    workdir: str | Path,
    preset: str = "tiny",
    overrides: dict[str, Any] | None = None,
    subjects: Sequence[str] = (),
    experiment: str = "proxytune-dreambench",
) -> dict[str, Any]:
    """The `dreambench` pipeline on this machine over a DreamBench-layout dataset (`subjects`:
    only these); the table goes to `<workdir>/bench.json`, `bench.md` and `bench.html`.
    Parameters, the dataset and every subject's photos are validated before any task starts."""
    from pipelines.proxy_tuning import build_dreambench
    from proxytune.analysis.bench import BENCH_FILE, REPORT_FILE, TABLE_FILE
    from proxytune.stages.dreambench import bench_subjects, with_bench_methods

    workdir = Path(workdir).resolve()
    dataset = _absolute(dataset_uri)
    overrides = with_bench_methods(preset, overrides or {})
    limits = RunParams.resolve(preset, overrides).ingest
    for subject in bench_subjects(dataset, subjects):
        scan_subject(subject["source_uri"], limits)
    workdir.mkdir(parents=True, exist_ok=True)
    with _local_kfp(workdir):
        task = build_dreambench(parallelism=1, local_code=run_identity())(
            dataset_uri=dataset,
            subjects=",".join(subjects),
            preset=preset,
            overrides=overrides,
            mlflow_experiment=experiment,
        )
    for name in (BENCH_FILE, TABLE_FILE, REPORT_FILE):
        shutil.copyfile(Path(task.outputs["bench"].path) / name, workdir / name)
    return read_json(workdir / BENCH_FILE)
