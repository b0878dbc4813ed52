"""Pipeline steps: what each KFP component calls, one function per stage.

A step resolves the run parameters (preset + overrides), opens the stage's MLflow child
run, picks the object store from the environment and calls the stage's library function;
it returns small metadata for the KFP artifact. Components stay one call long, and every
step can be run from a test or a notebook with plain paths. This module (with
`TrackingContext`, which every step takes) is all the components import.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from proxytune.core.config import RunParams
from proxytune.core.contracts import SUBJECT_FILE, Subject, read_adapter_card
from proxytune.core.params import IngestParams
from proxytune.core.tracking import TrackingContext, stage_run

__all__ = [
    "TrackingContext",
    "aggregate_step",
    "evaluate_step",
    "generate_proxy_step",
    "ingest_step",
    "merge_proxy_step",
    "plan_bench_step",
    "plan_step",
    "proxy_shards_step",
    "register_step",
    "tune_direct_step",
    "tune_student_step",
    "tune_supervisor_step",
]


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("urllib3", "matplotlib", "PIL", "httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()


def _names(subject_dirs: list[str]) -> str:
    """The subjects of a step that takes several, for its MLflow run's name and tag."""
    return ",".join(Subject.read(Path(d) / SUBJECT_FILE).name for d in subject_dirs)


def _for_ingest(subject: dict[str, str], params: RunParams) -> dict[str, Any]:
    """A planned subject with the run's `ingest` limits, which its ingest step applies: the
    limits the run was validated against travel with the subject (and key its cache)."""
    return {**subject, "ingest": params.ingest.model_dump()}


def plan_step(
    subjects: list[dict[str, str]], preset: str, overrides: dict[str, Any], tracking: TrackingContext
) -> list[dict[str, Any]]:
    """Validate the whole run (parameters, every subject, every proxy import within the run's
    `ingest` limits) before any GPU step; returns the subjects the pipeline fans out over, each
    with those limits (`_for_ingest`). The photos are checked by each subject's ingest, the
    step before its models load."""
    from proxytune.stages.ingest import plan_subjects
    from proxytune.stages.proxy_import import check_proxy_import

    configure_logging()
    params = RunParams.resolve(preset, overrides)
    subjects = plan_subjects(subjects)
    for subject in subjects:
        if subject.get("proxy_uri"):
            check_proxy_import(subject["proxy_uri"], subject["identifier"], params.ingest)
    with stage_run(tracking, "plan") as tracker:  # opens the parent run before the fan-out
        tracker.log_params({"preset": preset, "overrides": json.dumps(overrides, sort_keys=True)})
        tracker.log_params({"run": params.model_dump()})
        tracker.log_params({"subjects": json.dumps(subjects)})
    return [_for_ingest(subject, params) for subject in subjects]


def plan_bench_step(
    dataset_uri: str, subjects: str, preset: str, overrides: dict[str, Any], tracking: TrackingContext
) -> list[list[dict[str, Any]]]:
    """Validate a DreamBench-wide run (parameters, the dataset's subject list and folders);
    returns one single-subject group per subject, each its own student."""
    from proxytune.stages.dreambench import bench_subjects

    configure_logging()
    params = RunParams.resolve(preset, overrides)
    planned = bench_subjects(dataset_uri, [n.strip() for n in subjects.split(",") if n.strip()])
    with stage_run(tracking, "plan") as tracker:
        tracker.log_params({"preset": preset, "overrides": json.dumps(overrides, sort_keys=True)})
        tracker.log_params({"run": params.model_dump(), "dataset_uri": dataset_uri})
        tracker.log_params({"subjects": ",".join(s["name"] for s in planned)})
    return [[_for_ingest(subject, params)] for subject in planned]


def ingest_step(planned: dict[str, Any], out_dir: str, tracking: TrackingContext) -> dict[str, Any]:
    """Ingest one planned subject's photos (`plan_step` validated the fields) within the run's
    limits it planned with (`planned["ingest"]`)."""
    from proxytune.core.storage import store_from_env
    from proxytune.stages.ingest import ingest

    configure_logging()
    limits = IngestParams.model_validate(planned["ingest"])
    with stage_run(tracking, "ingest", subject=planned["name"]) as tracker:
        subject = ingest(
            planned["source_uri"],
            out_dir,
            planned["class_noun"],
            planned["name"],
            planned["identifier"],
            store_from_env(),
            planned.get("proxy_uri"),
            limits,
        )
        tracker.log_params(subject.model_dump(exclude={"images"}))
        tracker.log_metric("photos", len(subject.images))
        tracker.log_artifacts(Path(out_dir) / "images", "subject")
        return {"subject": subject.name, "photos": len(subject.images), "mlflow_run_id": tracker.run_id or ""}


def tune_supervisor_step(
    subject_dir: str, out_dir: str, preset: str, overrides: dict[str, Any], tracking: TrackingContext
) -> dict[str, Any]:
    from proxytune.core.storage import store_from_env
    from proxytune.stages.supervisor import tune_supervisor

    configure_logging()
    params = RunParams.resolve(preset, overrides)
    subject = Subject.read(Path(subject_dir) / SUBJECT_FILE).name
    with stage_run(tracking, "tune_supervisor", subject=subject) as tracker:
        card = tune_supervisor(subject_dir, out_dir, params.supervisor, tracker, store=store_from_env())
        return {"backend": card.backend, "steps": card.steps_done, "mlflow_run_id": tracker.run_id or ""}


def proxy_shards_step(planned: dict[str, str], preset: str, overrides: dict[str, Any]) -> list[int]:
    """One shard per `proxy.shards`; one for a subject whose proxy images are imported."""
    return [0] if planned.get("proxy_uri") else list(range(RunParams.resolve(preset, overrides).proxy.shards))


def generate_proxy_step(
    supervisor_dir: str,
    out_dir: str,
    shard: int,
    preset: str,
    overrides: dict[str, Any],
    tracking: TrackingContext,
) -> dict[str, Any]:
    from proxytune.core.storage import store_from_env
    from proxytune.stages.proxy import generate_proxy

    configure_logging()
    params = RunParams.resolve(preset, overrides)
    subject = read_adapter_card(supervisor_dir, "supervisor").subjects[0].name
    with stage_run(tracking, "generate_proxy", subject=subject) as tracker:
        info = generate_proxy(
            supervisor_dir,
            out_dir,
            params.proxy,
            store_from_env(),
            tracker,
            shard=shard,
            limits=params.ingest,
        )
        return {
            "images": info.num_images,
            "key": info.key,
            "part": str(info.part),
            "mlflow_run_id": tracker.run_id or "",
        }


def merge_proxy_step(
    part_dirs: list[str],
    out_dir: str,
    subject_dir: str,
    preset: str,
    overrides: dict[str, Any],
    tracking: TrackingContext,
) -> dict[str, Any]:
    """Join the proxy shards; with `proxy.keep_fraction`, keep the images most like the photos."""
    from proxytune.backends._base import default_device
    from proxytune.core.contracts import read_manifest
    from proxytune.core.storage import store_from_env
    from proxytune.stages.eval_score import load_encoder
    from proxytune.stages.ingest import load_subject
    from proxytune.stages.proxy import Selection, merge_proxy

    configure_logging()
    params = RunParams.resolve(preset, overrides)
    subject, photos = load_subject(subject_dir)
    with stage_run(tracking, "merge_proxy", subject=subject.name) as tracker:
        selection = None
        if params.proxy.keep_fraction:
            evaluation = params.evaluation
            encoder = load_encoder(evaluation.dino_encoder, evaluation.dino_source, default_device())
            selection = Selection(photos, encoder, params.proxy.keep_fraction)
        info = merge_proxy(part_dirs, out_dir, store_from_env(), selection)
        tracker.log_params({"keep_fraction": params.proxy.keep_fraction, "key": info.key})
        tracker.log_metric("proxy_images", info.num_images)
        if selection:
            scores = [r.scores["dino"] for r in read_manifest(out_dir)]
            tracker.log_metrics({"kept_dino_min": min(scores), "kept_dino_mean": sum(scores) / len(scores)})
        return {"images": info.num_images, "key": info.key, "mlflow_run_id": tracker.run_id or ""}


def tune_student_step(
    proxy_dirs: list[str], out_dir: str, preset: str, overrides: dict[str, Any], tracking: TrackingContext
) -> dict[str, Any]:
    from proxytune.core.storage import store_from_env
    from proxytune.stages.student import tune_student

    configure_logging()
    params = RunParams.resolve(preset, overrides)
    from proxytune.stages.proxy import load_proxy

    names = ",".join(load_proxy(d)[0].subject for d in proxy_dirs)
    with stage_run(tracking, "tune_student", subject=names) as tracker:
        card = tune_student(proxy_dirs, out_dir, params.student, store_from_env(), tracker)
        return {"backend": card.backend, "steps": card.steps_done, "mlflow_run_id": tracker.run_id or ""}


def tune_direct_step(
    subject_dirs: list[str], out_dir: str, preset: str, overrides: dict[str, Any], tracking: TrackingContext
) -> dict[str, Any]:
    """The direct-tuning baseline when `evaluation.methods` lists `direct`; otherwise a note in
    `out_dir` that none was asked for (KFP cannot feed the collected subjects into a
    conditional branch, so the task always runs and returns at once when not needed)."""
    from proxytune.core.storage import store_from_env
    from proxytune.stages.baseline import NOT_TRAINED, tune_direct

    configure_logging()
    params = RunParams.resolve(preset, overrides)
    if "direct" not in params.evaluation.methods:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / NOT_TRAINED).write_text("evaluation.methods does not list direct\n")
        return {"trained": False}
    with stage_run(tracking, "tune_direct", subject=_names(subject_dirs)) as tracker:
        card = tune_direct(subject_dirs, out_dir, params.student, store_from_env(), tracker)
        return {"trained": True, "steps": card.steps_done, "mlflow_run_id": tracker.run_id or ""}


def evaluate_step(
    subject_dirs: list[str],
    supervisor_dirs: list[str],
    student_dir: str,
    direct_dir: str,
    samples_dir: str,
    report_path: str,
    table_path: str,
    metrics_path: str,
    preset: str,
    overrides: dict[str, Any],
    tracking: TrackingContext,
) -> dict[str, float]:
    """Evaluate; the report is also copied to `report_path` (the KFP HTML artifact), the
    metrics table to `table_path` (the KFP Markdown artifact) and the flat metrics to
    `metrics_path` (see `write_metrics`). `direct_dir`: `tune_direct_step`'s
    output. Returns flat metrics per method (`student_dino`, `direct_clip_i`, ...) and the
    student's gains (`gain_vs_supervisor_dino`, ...) for the KFP Metrics artifact."""
    from proxytune.analysis.metrics import flat_gains
    from proxytune.stages.evaluate import COMPARISON_FILE, evaluate

    configure_logging()
    params = RunParams.resolve(preset, overrides)
    with stage_run(tracking, "evaluate", subject=_names(subject_dirs)) as tracker:
        evaluation = evaluate(
            subject_dirs,
            supervisor_dirs,
            student_dir,
            samples_dir,
            params.evaluation,
            tracker,
            direct_dir=direct_dir if "direct" in params.evaluation.methods else None,
        )
    shutil.copyfile(Path(samples_dir) / "report.html", report_path)
    shutil.copyfile(Path(samples_dir) / COMPARISON_FILE, table_path)
    scores = {
        f"{method}_{k}": v for method, values in evaluation["metrics"].items() for k, v in values.items()
    }
    return write_metrics(scores | flat_gains(evaluation["gains"]), metrics_path)


def write_metrics(scores: dict[str, float], path: str) -> dict[str, float]:
    """The KFP Metrics artifact's values also as a JSON file at its path: KFP keeps metrics in
    the artifact's metadata, but kfp.local's cache reuses a step only if every output artifact
    has a file. Returns `scores`."""
    from proxytune.core.fsutil import atomic_write_json

    atomic_write_json(path, scores)
    return scores


def register_step(
    student_dir: str,
    samples_dir: str,
    model_name: str,
    preset: str,
    overrides: dict[str, Any],
    tracking: TrackingContext,
) -> str:
    """Register the student (the gate from `registry`); returns the registration as JSON (the
    pipeline's output)."""
    from proxytune.stages.evaluate import read_evaluation
    from proxytune.stages.registration import default_model_name, register

    configure_logging()
    policy = RunParams.resolve(preset, overrides).registry
    evaluation = read_evaluation(samples_dir)
    with stage_run(tracking, "register", closes_pipeline=True) as tracker:
        registration = register(
            student_dir,
            evaluation,
            model_name or default_model_name([s["subject"] for s in evaluation["subjects"]]),
            tracking,
            tracker,
            policy,
        )
        return registration.model_dump_json()


def aggregate_step(
    evaluation_dirs: list[str],
    out_dir: str,
    report_path: str,
    table_path: str,
    metrics_path: str,
    tracking: TrackingContext,
) -> dict[str, float]:
    """The DreamBench-wide table (`proxytune.analysis.bench.aggregate`), its report copied to
    `report_path` (KFP HTML) and its Markdown to `table_path`; returns the means per method
    and gains as flat metrics (`student_dino`, `gain_vs_direct_dino`, ...)."""
    from proxytune.analysis.bench import REPORT_FILE, TABLE_FILE, aggregate
    from proxytune.analysis.metrics import flat_gains

    configure_logging()
    with stage_run(tracking, "aggregate", closes_pipeline=True) as tracker:
        table = aggregate(evaluation_dirs, out_dir)
        scores = {f"{m}_{k}": v for m, values in table["means"].items() for k, v in values.items()}
        scores |= flat_gains(table["gains"])
        tracker.log_metrics(scores)
        tracker.log_metric("subjects", len(table["subjects"]))
        for name in (REPORT_FILE, TABLE_FILE, "bench.json"):
            tracker.log_artifact(Path(out_dir) / name)
    shutil.copyfile(Path(out_dir) / REPORT_FILE, report_path)
    shutil.copyfile(Path(out_dir) / TABLE_FILE, table_path)
    return write_metrics(scores, metrics_path)
