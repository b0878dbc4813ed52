"""Evaluation: the student beside its supervisor, the direct-tuning baseline and the untuned
base model (`EvalParams.methods`) on DreamBench prompts, CLIP-I / CLIP-T / DINO.

Every method draws the same prompts with the same seeds. Reference features are computed
once per subject and shared by all methods; each model is loaded, sampled and released in
turn so only one generator is in memory at a time. A multi-subject student is evaluated on
every subject it learnt, each beside its own supervisor; the run's metrics are the means over
subjects. With `variance_samples`, each method also draws that many samples per subject on
varied prompts for the feature-variance analysis (`proxytune.analysis.variance`, the supplementary's
Fig. 1). The comparison (`proxytune.analysis.report`) gives the student's gain over each other method
and, with the published encoders and backends, the paper's numbers (`proxytune.analysis.paper`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from proxytune.analysis.metrics import PROTOCOL, flat_gains, gains
from proxytune.analysis.paper import reported_rows
from proxytune.analysis.report import comparison_markdown, write_report
from proxytune.analysis.variance import Spread, plot_variance
from proxytune.backends._base import ModelSource, default_device
from proxytune.core.contracts import EVALUATION_FILE, AdapterCard
from proxytune.core.fsutil import atomic_directory, atomic_write_json, atomic_write_text, read_json
from proxytune.core.params import EVAL_METHODS, EvalParams
from proxytune.core.tracking import Tracker
from proxytune.stages.eval_draw import VARIANCE_SEED, Drawn, SubjectRun, ar_adapters, draw, pair_supervisors
from proxytune.stages.eval_score import Encoders, References, score_subject

log = logging.getLogger(__name__)
VARIANCE_PLOT = "variance.png"
COMPARISON_FILE = "comparison.md"  # the metrics table (the KFP Markdown artifact)
CENTROID = "mean of the subject photos' DINO features"


def evaluate(
    subject_dirs: str | Path | Sequence[str | Path],
    supervisor_dirs: str | Path | Sequence[str | Path],
    student_dir: str | Path,
    out_dir: str | Path,
    params: EvalParams,
    tracker: Tracker | None = None,
    device: torch.device | None = None,
    direct_dir: str | Path | None = None,
) -> dict:
    """Sample every method of `params.methods` on each subject's prompts with the same seeds,
    score them, and write samples, the reference photos, `evaluation.json`, `comparison.md` and
    `report.html` (with `variance.png` when `variance_samples` is set) to `out_dir`.

    `direct_dir`: the direct baseline's adapter (`proxytune.stages.baseline`), needed when the methods
    list `direct`; `base` samples the student's untuned base model. Several subjects (a
    multi-subject student) are scored one by one; the run's `metrics` are their means (a
    method's over the subjects it was sampled on: a black-box supervisor, known only by its
    imported images, cannot draw the evaluation prompts). Adapters are checked and encoders
    load first, so a bad input fails before any sampling. Returns the evaluation."""
    tracker = tracker or Tracker()
    device = device or default_device()
    runs = pair_supervisors(_as_list(subject_dirs), _as_list(supervisor_dirs), params)
    adapters = ar_adapters(params.methods, student_dir, direct_dir)
    if sum(len(run.prompts) for run in runs) > VARIANCE_SEED:
        raise ValueError("so many metric samples would reuse the variance samples' seeds")
    tracker.log_params(params.model_dump())
    encoders = Encoders.load(params, device)
    log.info("encoders: %s", encoders.describe())
    tracker.log_params({"encoders": encoders.describe()})

    drawn = draw(runs, adapters, params, device)
    results, spreads = [], {}
    for run, images, spread in zip(runs, drawn.samples, drawn.spread, strict=True):
        references = References.of(encoders, run.photos)
        results.append(score_subject(encoders, run, references, images, params))
        if params.variance_samples:
            spreads[run.subject.name] = {
                method: Spread.of(encoders.dino.embed_images(spread[method]), references.dino)
                for method in spread
            }
            results[-1]["variance"] = {m: s.summary() for m, s in spreads[run.subject.name].items()}
    evaluation = _summarise(results, runs, adapters, drawn, encoders, params)
    _log_scores(tracker, evaluation["metrics"], results, "metrics")
    tracker.log_metrics(flat_gains(evaluation["gains"]))
    if spreads:
        _log_scores(tracker, evaluation["variance"]["means"], results, "variance")
    _write(out_dir, runs, evaluation, drawn, spreads)
    for name in ("report.html", EVALUATION_FILE, COMPARISON_FILE, *([VARIANCE_PLOT] if spreads else [])):
        tracker.log_artifact(Path(out_dir) / name)
    return evaluation


def _summarise(
    results: list[dict],
    runs: Sequence[SubjectRun],
    adapters: dict[str, tuple[Path, AdapterCard]],
    drawn: Drawn,
    encoders: Encoders,
    params: EvalParams,
) -> dict:
    """`evaluation.json`: per-subject results, the means, the student's gains over every other
    method, what each method was, and the paper's numbers where they apply."""
    student = adapters["student"][1]
    metrics = _means([r["metrics"] for r in results])
    supervisors = {run.supervisor.backend for run in runs}
    evaluation = {
        "subjects": results,
        "metrics": metrics,
        "gains": gains(metrics),
        "methods": {method: _describe(method, adapters, supervisors) for method in metrics},
        "protocol": PROTOCOL,
        "encoders": encoders.describe(),
        "student": {
            "backend": student.backend,
            "adapter_sha256": student.adapter_sha256,
            "sampling": drawn.sampling.model_dump(),
        },
        "reported": reported_rows(
            metrics, student.backend, supervisors, {"clip": params.clip_encoder, "dino": params.dino_encoder}
        ),
    }
    sources = {e["backend"]: e["source"] for e in evaluation["encoders"].values()}
    sources |= {card.backend: card.base_model.id for card in (student, *(run.supervisor for run in runs))}
    random = sorted(name for name, source in sources.items() if ModelSource(source).is_random)
    if random:  # the tiny preset: say the scores mean nothing
        evaluation["random_weights"] = random
    if params.variance_samples:
        evaluation["variance"] = {
            "samples": params.variance_samples,
            "first_seed": params.seed + VARIANCE_SEED,
            "features": params.dino_encoder,
            "centroid": CENTROID,
            "means": _means([r["variance"] for r in results]),
        }
    return evaluation


def _describe(method: str, adapters: dict[str, tuple[Path, AdapterCard]], supervisors: set[str]) -> dict:
    if method == "supervisor":
        return {"backends": sorted(supervisors)}
    card = adapters["student" if method == "base" else method][1]
    described = {"backend": card.backend, "base_model": card.base_model.id}
    if method != "base":
        described |= {"adapter_sha256": card.adapter_sha256, "training_data": card.params["training_data"]}
    return described


def _write(
    out_dir: str | Path,
    runs: Sequence[SubjectRun],
    evaluation: dict,
    drawn: Drawn,
    spreads: dict[str, dict[str, Spread]],
) -> None:
    """Samples, reference photos, `evaluation.json`, `comparison.md`, the plot and the report,
    all at once (a half-written evaluation is never left)."""
    with atomic_directory(out_dir) as tmp:
        for run, result, images in zip(runs, evaluation["subjects"], drawn.samples, strict=True):
            for sample in result["samples"]:
                (tmp / sample["file"]).parent.mkdir(parents=True, exist_ok=True)
                images[sample["model"]][sample["index"]].save(tmp / sample["file"])
            for file, photo in zip(result["references"], run.photos, strict=True):
                (tmp / file).parent.mkdir(parents=True, exist_ok=True)
                photo.save(tmp / file)
        atomic_write_json(tmp / EVALUATION_FILE, evaluation)
        atomic_write_text(tmp / COMPARISON_FILE, comparison_markdown(evaluation))
        if spreads:
            plot_variance(tmp / VARIANCE_PLOT, spreads)
        write_report(
            tmp / "report.html",
            runs,
            evaluation,
            drawn.samples,
            drawn.cards,
            tmp / VARIANCE_PLOT if spreads else None,
        )


def _means(per_subject: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Each model's scores averaged over the subjects it was sampled on."""
    means = {}
    for model in EVAL_METHODS:
        scored = [s[model] for s in per_subject if model in s]
        if scored:
            means[model] = {k: sum(s[k] for s in scored) / len(scored) for k in scored[0]}
    return means


def _log_scores(tracker: Tracker, means: dict[str, dict[str, float]], results: list[dict], key: str) -> None:
    """`results[i][key]` to the log, and to MLflow as `{model}_{score}` (the run's means) and,
    for several subjects, `{subject}.{model}_{score}`."""
    for result in results:
        for model, scores in result[key].items():
            log.info(
                "%s %s: %s", result["subject"], model, ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
            )
    tracker.log_metrics({f"{model}_{k}": v for model, scores in means.items() for k, v in scores.items()})
    if len(results) > 1:
        tracker.log_metrics(
            {
                f"{r['subject']}.{model}_{k}": v
                for r in results
                for model, scores in r[key].items()
                for k, v in scores.items()
            }
        )


def _as_list(dirs: str | Path | Sequence[str | Path]) -> list[str | Path]:
    return [dirs] if isinstance(dirs, str | Path) else list(dirs)


def read_evaluation(samples_dir: str | Path) -> dict:
    return read_json(Path(samples_dir) / EVALUATION_FILE)
