"""Registration: the student becomes an MLflow model version; aliases drive promotion.

Every new version gets alias `challenger`. It also becomes `champion` when there is no
champion yet, or when the promotion gate passes: no worse than the champion on DINO and
CLIP-I (the subject-fidelity metrics; CLIP-T is reported, not gated). Version tags carry
the metrics, so the gate and anyone browsing the registry read them from the version.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel

from proxytune import __version__
from proxytune.tracking import KFP_RUN_TAG, Tracker, TrackingContext

log = logging.getLogger(__name__)
CHALLENGER, CHAMPION = "challenger", "champion"
ADAPTER_ARTIFACT = "adapter"  # the pyfunc model's artifact that holds the student adapter
GATED_METRICS = ("dino", "clip_i")


class Registration(BaseModel):
    name: str
    version: str
    aliases: list[str]
    gate_passed: bool
    gate_reason: str
    previous_champion: str | None
    parent_run_id: str | None
    metrics: dict[str, dict[str, float]]


def default_model_name(subjects: list[str]) -> str:
    """`proxytune-<subject>`; a multi-subject student joins its subjects' names."""
    return "proxytune-" + "-".join(subjects)


def gate(candidate: dict[str, float], champion: dict[str, float] | None) -> tuple[bool, str]:
    """Promotion gate: passes with no champion, or when no gated metric is worse."""
    if champion is None:
        return True, "no champion yet"
    worse = [m for m in GATED_METRICS if candidate[m] < champion[m]]
    if worse:
        detail = ", ".join(f"{m} {candidate[m]:.4f} < {champion[m]:.4f}" for m in worse)
        return False, f"worse than the champion on {detail}"
    return True, "no worse than the champion on " + " and ".join(GATED_METRICS)


def register(
    student_dir: str | Path,
    evaluation: dict,
    model_name: str,
    context: TrackingContext,
    tracker: Tracker,
) -> Registration:
    """Log the student adapter as a pyfunc model in the stage's run, register a version,
    set aliases by the gate."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from proxytune import serving

    uri = context.resolved_uri()
    if not uri or tracker.run_id is None:
        raise ValueError(
            "register needs MLflow: set MLFLOW_TRACKING_URI or the pipeline's mlflow_tracking_uri"
        )
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    metrics = evaluation["metrics"]
    student = metrics["student"]
    with mlflow.start_run(run_id=tracker.run_id):
        logged = mlflow.pyfunc.log_model(
            name="student",
            python_model=serving.__file__,
            artifacts={ADAPTER_ARTIFACT: str(student_dir)},
            pip_requirements=[f"proxytune=={__version__}"],
            metadata={"subjects": {s["subject"]: s["identifier"] for s in evaluation["subjects"]}},
        )
    tags = {
        **{k: f"{v:.6f}" for k, v in student.items()},
        **{f"supervisor_{k}": f"{v:.6f}" for k, v in metrics.get("supervisor", {}).items()},
        "subjects": ",".join(s["subject"] for s in evaluation["subjects"]),
        "class_nouns": ",".join(s["class_noun"] for s in evaluation["subjects"]),
        KFP_RUN_TAG: context.kfp_run_id,
    }
    version = mlflow.register_model(logged.model_uri, model_name, tags=tags).version
    try:
        previous = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        previous = None
    champion_metrics = {m: float(previous.tags[m]) for m in GATED_METRICS} if previous else None
    passed, reason = gate(student, champion_metrics)
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    aliases = [CHALLENGER]
    if passed:
        client.set_registered_model_alias(model_name, CHAMPION, version)
        aliases.append(CHAMPION)
    client.set_model_version_tag(model_name, version, "gate", f"{'passed' if passed else 'failed'}: {reason}")
    log.info("registered %s version %s, aliases %s (gate: %s)", model_name, version, aliases, reason)
    tracker.set_tags({"registered_model": model_name, "registered_version": version})
    return Registration(
        name=model_name,
        version=str(version),
        aliases=aliases,
        gate_passed=passed,
        gate_reason=reason,
        previous_champion=str(previous.version) if previous else None,
        parent_run_id=tracker.parent_run_id,
        metrics=metrics,
    )
