"""Registration and promotion: the student becomes an MLflow model version; aliases drive
promotion, tags keep the record.

- Every new version gets alias `challenger`.
- It takes `champion` when there is none yet, or when it passes the gate against the
  champion (`registry.gate`: how far below the champion's each metric may be; default DINO
  and CLIP-I not below, CLIP-T at most 0.01 below). The champion it displaces becomes
  `previous-champion`.
- Races: two registrations finishing at once both read the champion, and the alias is
  last-writer-wins. So after taking `champion`, a version waits `registry.settle_seconds`
  and re-reads it; if another version holds it, it contests again against that one (a tie
  goes to the newer version), or ends as challenger with tags saying which version beat it.
- The decision and its reason are version tags (`gate`, `gate.champion_before`) and run tags;
  every alias change by a person (`promote`, `rollback`) leaves an `audit.<time>` version tag
  naming who and why.
"""

from __future__ import annotations

import datetime
import getpass
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from proxytune import __version__
from proxytune.core.params import GATED_METRICS, RegistryParams
from proxytune.core.tracking import KFP_RUN_TAG, Tracker, TrackingContext

log = logging.getLogger(__name__)
CHALLENGER, CHAMPION, PREVIOUS = "challenger", "champion", "previous-champion"
CLUSTER_ONLY = {"kfp", "kfp-kubernetes", "kubernetes"}  # not needed to serve a model
CONTEST_ROUNDS = 5


class Registration(BaseModel):
    name: str
    version: str
    aliases: list[str]
    gate_passed: bool
    gate_reason: str
    previous_champion: str | None
    parent_run_id: str | None
    metrics: dict[str, dict[str, float]]


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    champion_before: str | None  # the champion this version was judged against (and displaced)


def default_model_name(subjects: list[str]) -> str:
    """`proxytune-<subject>`; a multi-subject student joins its subjects' names."""
    return "proxytune-" + "-".join(subjects)


def gate(
    candidate: dict[str, float], champion: dict[str, float] | None, tolerance: dict[str, float] | None = None
) -> tuple[bool, str]:
    """Passes with no champion, or when no gated metric is further below the champion's than
    its tolerance allows."""
    if champion is None:
        return True, "no champion yet"
    tolerance = RegistryParams().gate if tolerance is None else tolerance
    worse = [m for m, allowed in tolerance.items() if candidate[m] < champion[m] - allowed - 1e-12]
    if worse:
        detail = ", ".join(f"{m} {candidate[m]:.4f} < {champion[m]:.4f}" for m in worse)
        return False, f"worse than the champion on {detail}"
    return True, "no worse than the champion on " + " and ".join(sorted(tolerance)) + " (within tolerance)"


def register(
    student_dir: str | Path,
    evaluation: dict,
    model_name: str,
    context: TrackingContext,
    tracker: Tracker,
    policy: RegistryParams | None = None,
) -> Registration:
    """Log the student as a servable pyfunc model in the stage's run, register a version and
    let it contest `champion` through the gate."""
    import mlflow
    from mlflow import MlflowClient

    policy = policy or RegistryParams()
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
        logged = log_served_model(student_dir, evaluation)
    tags = {
        **{k: f"{v:.6f}" for k, v in student.items()},
        **{
            f"{m}_{k}": f"{v:.6f}"
            for m, scores in metrics.items()
            if m != "student"
            for k, v in scores.items()
        },
        "subjects": ",".join(s["subject"] for s in evaluation["subjects"]),
        "class_nouns": ",".join(s["class_noun"] for s in evaluation["subjects"]),
        KFP_RUN_TAG: context.kfp_run_id,
    }
    version = str(mlflow.register_model(logged.model_uri, model_name, tags=tags).version)
    set_alias(client, model_name, CHALLENGER, version)
    decision = contest(client, model_name, version, policy)
    aliases = [CHALLENGER, CHAMPION] if decision.promoted else [CHALLENGER]
    log.info("registered %s version %s, aliases %s (%s)", model_name, version, aliases, decision.reason)
    tracker.set_tags(
        {
            "registered_model": model_name,
            "registered_version": version,
            "promoted": str(decision.promoted).lower(),
            "gate": decision.reason,
        }
    )
    return Registration(
        name=model_name,
        version=version,
        aliases=aliases,
        gate_passed=decision.promoted,
        gate_reason=decision.reason,
        previous_champion=decision.champion_before,
        parent_run_id=tracker.parent_run_id,
        metrics=metrics,
    )


def log_served_model(student_dir: str | Path, evaluation: dict):
    """The student as a pyfunc model that serves from the registry alone: the project's code
    ships with it (`code_paths`), its dependencies pinned at the versions that ran here, and
    a signature whose params default to the student's reference sampling."""
    import mlflow

    import proxytune
    from proxytune.core.contracts import ADAPTER_ARTIFACT, read_adapter_card
    from proxytune.core.registry import STUDENTS
    from proxytune.serving import model as served_model

    card = read_adapter_card(student_dir, "student")
    return mlflow.pyfunc.log_model(
        name="student",
        python_model=served_model.__file__,
        artifacts={ADAPTER_ARTIFACT: str(student_dir)},
        code_paths=[str(Path(proxytune.__file__).parent)],
        pip_requirements=served_requirements(),
        signature=served_signature(STUDENTS.create(card.backend).sampling),
        metadata={
            "subjects": {s["subject"]: s["identifier"] for s in evaluation["subjects"]},
            "backend": card.backend,
            "base_model": card.base_model.model_dump(),
            "proxytune_version": __version__,
        },
    )


def served_signature(sampling):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),  # a list of prompts (a named column would need a DataFrame)
        outputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed"), ColSpec("binary", "image")]),
        params=ParamSchema(
            [
                ParamSpec("seed", "long", 0),
                ParamSpec("num_images", "long", 1),
                ParamSpec("guidance_scale", "double", float(sampling.guidance_scale)),
                ParamSpec("top_k", "long", int(sampling.top_k)),
                ParamSpec("temperature", "double", float(sampling.temperature)),
                ParamSpec("top_p", "double", float(sampling.top_p)),
            ]
        ),
    )


def served_requirements() -> list[str]:
    """proxytune's runtime dependencies pinned at the installed versions (`2.13.0+cpu` -> `2.13.0`)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins = []
    for requirement in map(Requirement, metadata.requires("proxytune") or []):
        name = canonicalize_name(requirement.name)
        if requirement.marker is None and name not in CLUSTER_ONLY:
            pins.append(f"{name}=={Version(metadata.version(name)).public}")
    return sorted(pins)


def contest(client, name: str, version: str, policy: RegistryParams, force: bool = False) -> Decision:
    """Take `champion` if the gate allows against its holder (or `force`), then confirm after
    `settle_seconds` that no concurrent registration took it meanwhile, contesting again
    against any that did. The holder is re-read right before taking the alias, so only a
    writer slower than the settle time can slip past unjudged. Writes the decision to the
    version's `gate` tags."""
    mine = version_metrics(client, name, version)
    decision, taken = Decision(False, "lost the race for champion repeatedly", None), False
    for _ in range(CONTEST_ROUNDS):
        holder = alias_version(client, name, CHAMPION)
        if holder == version:
            if not taken:
                decision = Decision(True, "already the champion", None)
            break
        if holder is not None and not force:
            theirs = version_metrics(client, name, holder)
            passed, reason = gate(mine, theirs, policy.gate)
            tied = passed and gate(theirs, mine, policy.gate)[0]
            if not passed or (tied and int(holder) > int(version)):
                why = reason if not passed else "ties with a newer version"
                after = ", which took champion after this one did" if taken else ""
                decision = Decision(False, f"{why} (champion: version {holder}{after})", holder)
                break
            decision = Decision(True, f"{reason} (champion was version {holder})", holder)
        else:
            decision = Decision(True, "forced" if force else "no champion yet", holder)
        if alias_version(client, name, CHAMPION) != holder:
            continue  # it changed while this version was being judged: judge again
        if not set_alias(client, name, CHAMPION, version):
            continue  # another version's write to the alias won this instant: judge again
        if holder is not None:
            set_alias(client, name, PREVIOUS, holder)
        taken = True
        time.sleep(policy.settle_seconds)
    else:
        if alias_version(client, name, CHAMPION) != version:
            decision = Decision(False, "lost the race for champion repeatedly", decision.champion_before)
    verdict = "passed" if decision.promoted else "failed"
    client.set_model_version_tag(name, version, "gate", f"{verdict}: {decision.reason}")
    client.set_model_version_tag(name, version, "gate.champion_before", decision.champion_before or "none")
    return decision


def set_alias(client, name: str, alias: str, version: str) -> bool:
    """Point `alias` at `version`; False when the registry refused because a concurrent write
    to the same alias landed first (its unique constraint; seen as a 400 from a SQL store), so
    the caller re-reads instead of failing. Any other refusal is raised."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException:
        if alias_version(client, name, alias) is None:
            raise
        log.info("%s: a concurrent write to alias %s came first", name, alias)
        return False
    return True


def version_metrics(client, name: str, version: str) -> dict[str, float]:
    tags = client.get_model_version(name, version).tags
    return {m: float(tags[m]) for m in GATED_METRICS if m in tags}


def alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def promote(
    client, name: str, version: str, force: bool = False, policy: RegistryParams | None = None
) -> Decision:
    """A person promotes `version` to champion: through the gate unless `force`; audited (who
    acts is known before any alias moves, so nothing moves unaudited)."""
    who = operator()
    client.get_model_version(name, version)  # a clear MLflow error for an unknown version
    decision = contest(client, name, version, policy or RegistryParams(), force=force)
    what = "forced promotion" if force else "promotion through the gate"
    outcome = "promoted" if decision.promoted else "refused"
    audit(client, name, version, f"{what}: {outcome} ({decision.reason})", who)
    return decision


def rollback(client, name: str) -> tuple[str, str]:
    """`champion` back to `previous-champion`; returns (from, to). Audited on both versions;
    `previous-champion` is removed so that a second rollback cannot bring the bad one back."""
    who = operator()
    current, previous = alias_version(client, name, CHAMPION), alias_version(client, name, PREVIOUS)
    if previous is None:
        raise ValueError(f"{name} has no {PREVIOUS} to roll back to (champion: {current or 'none'})")
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.delete_registered_model_alias(name, PREVIOUS)
    audit(client, name, previous, f"rollback: champion again, replacing version {current}", who)
    if current:
        audit(client, name, current, f"rollback: champion handed back to version {previous}", who)
    return current or "none", previous


def operator() -> str:
    """Who acts, as `user@host`; never fails: a UID with no passwd entry (the arbitrary UIDs of
    OpenShift pods) is `uid-<n>`."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid-{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def audit(client, name: str, version: str, event: str, who: str) -> None:
    """An `audit.<UTC time>` tag on the version: what happened, by whom (`operator()`), from where."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    client.set_model_version_tag(name, version, f"audit.{now}", f"{event} by {who}")
    log.info("%s version %s: %s by %s", name, version, event, who)


def describe_versions(client, name: str) -> list[dict[str, str]]:
    """Every version of `name`, newest first: aliases, metrics, gate decision, audit count."""
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for version in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: -int(v.version)):
        tags = version.tags
        rows.append(
            {
                "version": str(version.version),
                "aliases": ", ".join(sorted(aliases.get(str(version.version), []))),
                **{m: tags.get(m, "") for m in GATED_METRICS},
                "gate": tags.get("gate", ""),
                "audits": str(sum(k.startswith("audit.") for k in tags)),
            }
        )
    return rows
