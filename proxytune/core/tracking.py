"""MLflow tracking: one parent run per pipeline run, one child run per stage.

Stages run in separate pods (or processes, locally), so they meet through MLflow itself:
the parent run is the one tagged with the KFP run id, created by whichever stage comes
first. Metrics are buffered and sent in batches (one request per 100 points, not per step).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

KFP_RUN_TAG = "proxytune.kfp_run_id"
ROLE_TAG = "proxytune.role"
STAGE_TAG = "proxytune.stage"
SUBJECT_TAG = "proxytune.subject"
PARENT_TAG = "mlflow.parentRunId"
# A local run (`proxytune.ops.runner`) names itself and its workdir in the environment of its steps,
# so that an interrupted run's MLflow runs, or a hard-killed one's, can be found and marked KILLED.
LOCAL_RUN_ENV, LOCAL_RUN_TAG = "PROXYTUNE_LOCAL_RUN", "proxytune.local_run"
WORKDIR_ENV, WORKDIR_TAG = "PROXYTUNE_WORKDIR", "proxytune.workdir"


def local_tags() -> dict[str, str]:
    """The local run's tags (none for a run on Kubeflow)."""
    tags = {LOCAL_RUN_TAG: os.environ.get(LOCAL_RUN_ENV), WORKDIR_TAG: os.environ.get(WORKDIR_ENV)}
    return {k: v for k, v in tags.items() if v}


@dataclass(frozen=True)
class TrackingContext:
    """Where and under which pipeline run a stage logs.

    `tracking_uri` empty means `$MLFLOW_TRACKING_URI`; if that is unset too, tracking is
    off (library use in a notebook) and stages log to the console only.
    """

    tracking_uri: str = ""
    experiment: str = "proxytune"
    kfp_run_id: str = ""
    kfp_run_name: str = ""

    def resolved_uri(self) -> str:
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")


class Tracker:
    """Logging sink of one stage; this base class logs nowhere (tracking off)."""

    run_id: str | None = None
    parent_run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.log_metric(key, value, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def flush(self) -> None:
        pass


class MlflowTracker(Tracker):
    BATCH = 100

    def __init__(self, client, run_id: str, parent_run_id: str):
        self.client, self.run_id, self.parent_run_id = client, run_id, parent_run_id
        self._metrics: list = []

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        from mlflow.entities import Metric

        self._metrics.append(Metric(key, float(value), int(time.time() * 1000), step or 0))
        if len(self._metrics) >= self.BATCH:
            self.flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def flush(self) -> None:
        if self._metrics:
            self.client.log_batch(self.run_id, metrics=self._metrics)
            self._metrics = []


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def ensure_experiment(client, name: str, tracking_uri: str) -> str:
    """Experiment id by name, creating it; a SQLite store keeps artifacts beside the DB file."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        location = (Path(parsed.path).parent / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def find_or_create_parent(client, experiment_id: str, context: TrackingContext) -> str:
    run_key = context.kfp_run_id or uuid.uuid4().hex
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{KFP_RUN_TAG}` = '{run_key}' and tags.`{ROLE_TAG}` = 'pipeline'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name=context.kfp_run_name or f"proxy-tuning-{run_key[:8]}",
        tags={KFP_RUN_TAG: run_key, ROLE_TAG: "pipeline", **local_tags()},
    )
    return run.info.run_id


@contextlib.contextmanager
def stage_run(
    context: TrackingContext, stage: str, closes_pipeline: bool = False, subject: str | None = None
) -> Iterator[Tracker]:
    """A child run for `stage` under the pipeline's parent run (per subject for the stages
    that fan out over subjects: named "stage (subject)" and tagged with the subject).

    The run ends FINISHED, or FAILED (and the parent too) if the block raises; the last
    stage passes `closes_pipeline=True` to mark the parent FINISHED.
    """
    uri = context.resolved_uri()
    if not uri:
        log.warning("no MLflow tracking URI (MLFLOW_TRACKING_URI unset): %s is not tracked", stage)
        yield Tracker()
        return
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, context.experiment, uri)
    parent = find_or_create_parent(client, experiment_id, context)
    tags = {
        PARENT_TAG: parent,
        STAGE_TAG: stage,
        ROLE_TAG: "stage",
        KFP_RUN_TAG: context.kfp_run_id,
        **local_tags(),
    }
    run = client.create_run(
        experiment_id,
        run_name=f"{stage} ({subject})" if subject else stage,
        tags={**tags, SUBJECT_TAG: subject} if subject else tags,
    )
    tracker = MlflowTracker(client, run.info.run_id, parent)
    log.info("MLflow: %s run %s (parent %s) at %s", stage, run.info.run_id, parent, redact(uri))
    try:
        yield tracker
    except BaseException:
        tracker.flush()
        client.set_terminated(run.info.run_id, "FAILED")
        client.set_terminated(parent, "FAILED")
        raise
    tracker.flush()
    client.set_terminated(run.info.run_id, "FINISHED")
    if closes_pipeline:
        client.set_terminated(parent, "FINISHED")


def redact(uri: str) -> str:
    """A URI fit for logs: user info (credentials) removed."""
    parsed = urlparse(uri)
    if parsed.username or parsed.password:
        return parsed._replace(netloc=parsed.hostname + (f":{parsed.port}" if parsed.port else "")).geturl()
    return uri
