"""`proxytune submit` and `proxytune schedule`: a run config (`proxytune.ops.runconfig`) on a
Kubeflow Pipelines cluster, as one run or as a recurring run.

Both compile the pipeline here with the cluster options (what `proxytune compile` writes)
and send it with the config's arguments (`RunConfig.pipeline_arguments`, what `run --local`
passes too). `submit` can wait for the run and then read its outcome from the MLflow
registry: the version `register` made carries the KFP run id as the tag
`proxytune.kfp_run_id`, and holds `champion` when it was promoted.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pipelines.cluster import ClusterOptions
from pipelines.proxy_tuning import compile_pipeline
from proxytune.core.tracking import KFP_RUN_TAG
from proxytune.ops.runconfig import RunConfig
from proxytune.ops.upload import check_host, kubeflow
from proxytune.stages.registration import CHAMPION, default_model_name

log = logging.getLogger(__name__)
FINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELED", "SKIPPED")
POLL_SECONDS = 5.0
MAX_POLL_ERRORS = 5  # failed polls in a row tolerated while waiting (API restarts, network blips)
METRICS = ("clip_i", "clip_t", "dino")
CRON_FIELDS = (  # robfig/cron, which KFP's scheduler uses: seconds first
    ("second", 0, 59),
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 6),
)
MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
CRON_NAMES = {
    "month": {m: i for i, m in enumerate(MONTHS, 1)},
    "day of week": {d: i for i, d in enumerate(DAYS)},
}


@dataclass(frozen=True)
class Started:
    run_id: str
    run_name: str
    url: str


@dataclass(frozen=True)
class Scheduled:
    recurring_run_id: str
    name: str
    cron: str
    url: str
    replaced: list[str]  # ids of the recurring runs of that name it replaced


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    aliases: list[str]
    gate: str
    metrics: dict[str, float]  # the student's, then supervisor_* when the run tuned one

    @property
    def champion(self) -> bool:
        return CHAMPION in self.aliases


def run_name(config: RunConfig) -> str:
    """`<registered model>-<UTC time>`: says what the run trains, and sorts by time in the UI."""
    return f"{model_name(config)}-{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%SZ}"


def model_name(config: RunConfig) -> str:
    return config.registered_model_name or default_model_name([s["name"] for s in config.pipeline_subjects()])


def submit(
    host: str,
    cluster: ClusterOptions,
    config: RunConfig,
    namespace: str | None = None,
    service_account: str | None = None,
) -> Started:
    """Compile, then start one run in the config's experiment, its pods under `service_account`
    (None: KFP's default); raises ValueError when the config cannot run on a cluster or
    Kubeflow refuses or is unreachable."""
    check_host(host)
    config.require_remote_subjects()
    name = run_name(config)
    with tempfile.TemporaryDirectory(prefix="proxytune-submit-") as tmp:
        package = compile_pipeline(str(Path(tmp) / "pipeline.yaml"), cluster)
        with kubeflow(host, "the run") as client, _quiet():
            started = client.create_run_from_pipeline_package(
                package,
                arguments=config.pipeline_arguments(),
                run_name=name,
                experiment_name=config.experiment,
                namespace=namespace,
                service_account=service_account,
            )
    return Started(started.run_id, name, f"{host.rstrip('/')}/#/runs/details/{started.run_id}")


def wait_for_run(
    host: str,
    run_id: str,
    timeout: float,
    poll_seconds: float = POLL_SECONDS,
) -> str | None:
    """Poll the run until it reaches a final state (returned, e.g. "SUCCEEDED") or `timeout`
    seconds pass (None). A run lasts hours, so up to MAX_POLL_ERRORS failed polls in a row
    are retried; then RuntimeError (the run itself goes on)."""
    import urllib3
    from kfp_server_api import ApiException

    deadline = time.monotonic() + timeout
    with kubeflow(host, "the status request") as client:
        failures = 0
        while True:
            try:
                state = str(client.get_run(run_id).state or "")
                failures = 0
            except (ApiException, urllib3.exceptions.HTTPError) as error:
                status = (error.status or 0) if isinstance(error, ApiException) else 0
                reason = f"{error.status} {error.reason}" if isinstance(error, ApiException) else error
                failures += 1
                if (0 < status < 500 and status != 429) or failures > MAX_POLL_ERRORS:
                    raise RuntimeError(f"lost Kubeflow Pipelines at {host} while waiting: {reason}") from None
                log.warning("polling run %s failed (%s); retrying", run_id, reason)
                state = ""
            if state in FINAL_STATES:
                return state
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            log.info("run %s: %s", run_id, state or "unknown")
            time.sleep(min(poll_seconds, remaining))


def registered_version(tracking_uri: str, run_id: str) -> RegisteredVersion | None:
    """The model version the run registered (found by its `proxytune.kfp_run_id` tag), with
    its aliases as they are now; None when the run registered none. RuntimeError when the
    registry cannot be read."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        found = client.search_model_versions(f"tags.`{KFP_RUN_TAG}` = '{run_id}'")
        if not found:
            return None
        newest = max(found, key=lambda v: int(v.version))
        version = client.get_model_version(newest.name, newest.version)  # search leaves aliases out
    except MlflowException as error:
        raise RuntimeError(f"cannot read the MLflow registry at {tracking_uri}: {error.message}") from None
    tags = version.tags
    keys = [*METRICS, *(f"supervisor_{k}" for k in METRICS)]
    metrics = {k: float(tags[k]) for k in keys if k in tags}
    return RegisteredVersion(
        name=version.name,
        version=str(version.version),
        aliases=sorted(version.aliases),
        gate=tags.get("gate", ""),
        metrics=metrics,
    )


def kfp_cron(expression: str) -> str:
    """KFP's cron (6 fields, seconds first: robfig/cron) from a standard 5-field one (seconds 0
    are put in front) or a 6-field one; raises ValueError for anything else. Given to KFP as-is,
    a 5-field expression would be read with its minutes as seconds."""
    fields = expression.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    elif len(fields) != 6:
        raise ValueError(
            f"--cron {expression!r}: expected 5 fields (minute hour day-of-month month day-of-week, "
            f"e.g. '0 3 * * 1' for Mondays at 03:00) or KFP's 6 with seconds first, got {len(fields)}"
        )
    for text, (what, low, high) in zip(fields, CRON_FIELDS, strict=True):
        problem = _cron_field_problem(text, low, high, CRON_NAMES.get(what, {}))
        if problem:
            raise ValueError(f"--cron {expression!r}: {what} field {text!r}: {problem}")
    return " ".join(fields)


def _cron_field_problem(text: str, low: int, high: int, names: dict[str, int]) -> str:
    """What is wrong with one field (a list of `*`, `?`, `N`, `N-M`, each with an optional
    `/step`; names for months and days), or ""."""
    for part in text.split(","):
        base, slash, step = part.partition("/")
        if slash and not (step.isdigit() and int(step) > 0):
            return f"step {step!r} must be a positive number"
        if base in ("*", "?"):
            continue
        bounds = []
        for value in base.split("-", 1):
            number = names.get(value.upper()) if value.isalpha() else int(value) if value.isdigit() else None
            if number is None or not low <= number <= high:
                return f"{value!r} is not a number in {low}-{high}" + (
                    f" or one of {', '.join(names)}" if names else ""
                )
            bounds.append(number)
        if bounds != sorted(bounds):
            return f"range {base!r} runs backwards"
    return ""


def schedule(
    host: str,
    cluster: ClusterOptions,
    config: RunConfig,
    cron: str,
    name: str | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
) -> Scheduled:
    """Create a recurring run of the config (default name: the registered model's), or
    replace the recurring runs of that name. KFP cannot update one, so the new one is created
    first and the old ones are deleted after: a refused create leaves the old schedule as it
    was. The cron expression and the config are checked before anything is sent."""
    cron = kfp_cron(cron)
    check_host(host)
    config.require_remote_subjects()
    name = name or model_name(config)
    with tempfile.TemporaryDirectory(prefix="proxytune-schedule-") as tmp:
        package = compile_pipeline(str(Path(tmp) / "pipeline.yaml"), cluster)
        with kubeflow(host, "the recurring run") as client:
            old = _recurring_runs_named(client, name, namespace)
            with _quiet():
                experiment = client.create_experiment(config.experiment, namespace=namespace)
            created = client.create_recurring_run(
                experiment_id=experiment.experiment_id,
                job_name=name,
                description=f"proxytune schedule of {config.source or 'command-line flags'}",
                cron_expression=cron,
                max_concurrency=1,  # never two retrainings of one model at once
                no_catchup=True,  # after a pause, one run, not one per missed time
                params=config.pipeline_arguments(),
                pipeline_package_path=package,
                service_account=service_account,
            )
            for recurring_run_id in old:
                client.delete_recurring_run(recurring_run_id)
    recurring_run_id = created.recurring_run_id
    url = f"{host.rstrip('/')}/#/recurringrun/details/{recurring_run_id}"
    return Scheduled(recurring_run_id, name, cron, url, old)


def _recurring_runs_named(client, name: str, namespace: str | None) -> list[str]:
    """Ids of every recurring run called `name` (in `namespace` on a multi-user Kubeflow)."""
    named = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    found, token = [], ""
    while True:
        page = client.list_recurring_runs(page_token=token, page_size=100, namespace=namespace, filter=named)
        found += [r.recurring_run_id for r in page.recurring_runs or [] if r.display_name == name]
        token = page.next_page_token
        if not token:
            return found


def _quiet() -> contextlib.AbstractContextManager:
    """kfp prints links it builds itself; the commands print theirs."""
    return contextlib.redirect_stdout(io.StringIO())
