"""Evaluation: student and supervisor on DreamBench prompts, CLIP-I / CLIP-T / DINO.

Reference features are computed once per subject and shared by both models; each model is
loaded, sampled and released in turn so only one generator is in memory at a time. A
multi-subject student is evaluated on every subject it learnt, each beside its own
supervisor; the run's metrics are the means over subjects. With `variance_samples`, each
model also draws that many samples per subject on varied prompts for the feature-variance
analysis (`proxytune.variance`, the supplementary's Fig. 1).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from proxytune.backends._base import ImageEncoder, ModelSource, default_device
from proxytune.config import EvalParams
from proxytune.contracts import EVALUATION_FILE, AdapterCard, Subject, read_adapter_card
from proxytune.fsutil import atomic_directory, atomic_write_json, atomic_write_text, read_json
from proxytune.ingest import load_subject
from proxytune.metrics import PROTOCOL, mean_paired_cosine, mean_pairwise_cosine
from proxytune.prompts import dreambench_prompts, fill
from proxytune.registry import ENCODERS
from proxytune.report import markdown_table, write_report
from proxytune.sampling import Sampling
from proxytune.student import load_student
from proxytune.supervisor import load_supervisor
from proxytune.tracking import Tracker
from proxytune.variance import Spread, plot_variance

log = logging.getLogger(__name__)
MODELS = ("student", "supervisor")
VARIANCE_PLOT = "variance.png"
COMPARISON_FILE = "comparison.md"  # the metrics table (the KFP Markdown artifact)
# Variance samples draw seeds params.seed + VARIANCE_SEED + i, the same for every subject and
# model whatever the metric settings, and apart from the metric samples' params.seed + i.
VARIANCE_SEED = 1_000_000
CENTROID = "mean of the subject photos' DINO features"


@dataclass
class Encoders:
    clip: ImageEncoder
    dino: ImageEncoder

    @classmethod
    def load(cls, params: EvalParams, device: torch.device) -> Encoders:
        return cls(
            load_encoder(params.clip_encoder, params.clip_source, device),
            load_encoder(params.dino_encoder, params.dino_source, device),
        )

    def describe(self) -> dict[str, dict[str, str | None]]:
        """Backend, source and resolved revision of each, for outputs to record."""
        return {"clip": self.clip.describe(), "dino": self.dino.describe()}


def load_encoder(name: str, source: str | None, device: torch.device) -> ImageEncoder:
    """Encoder `name` with its weights from `source` (a hub id, a folder or an s3:// prefix:
    staged weights on an air-gapped cluster), else from its registered default."""
    encoder = ENCODERS.create(name)
    encoder.load(device, ModelSource(source) if source else None)
    return encoder


@dataclass
class References:
    """Features of the subject's real photos, computed once per evaluation."""

    clip: torch.Tensor
    dino: torch.Tensor

    @classmethod
    def of(cls, encoders: Encoders, photos: Sequence[Image.Image]) -> References:
        return cls(encoders.clip.embed_images(photos), encoders.dino.embed_images(photos))


@dataclass
class Features:
    """Features of one model's samples, computed once for the totals and per-prompt scores."""

    clip: torch.Tensor
    dino: torch.Tensor
    text: torch.Tensor

    @classmethod
    def of(cls, encoders: Encoders, images: Sequence[Image.Image], texts: Sequence[str]) -> Features:
        return cls(
            encoders.clip.embed_images(images),
            encoders.dino.embed_images(images),
            encoders.clip.embed_texts(texts),
        )

    def scores(self, references: References, rows: slice = slice(None)) -> dict[str, float]:
        return {
            "clip_i": mean_pairwise_cosine(self.clip[rows], references.clip),
            "clip_t": mean_paired_cosine(self.clip[rows], self.text[rows]),
            "dino": mean_pairwise_cosine(self.dino[rows], references.dino),
        }


@dataclass
class SubjectRun:
    """One subject under evaluation: its photos, prompts and supervisor."""

    subject: Subject
    photos: list[Image.Image]
    supervisor_dir: Path
    templates: list[str]
    prompts: list[str]  # with the identifier, one per image
    clean: list[str]  # without it, for CLIP-T
    variance_prompts: list[str]  # the whole DreamBench list, cycled, one per variance sample

    @classmethod
    def of(cls, subject_dir: str | Path, supervisor_dir: Path, params: EvalParams) -> SubjectRun:
        subject, photos = load_subject(subject_dir)
        templates = dreambench_prompts(subject.class_noun, params.num_prompts)
        repeat = params.images_per_prompt
        bank = dreambench_prompts(subject.class_noun)
        return cls(
            subject,
            photos,
            supervisor_dir,
            templates,
            [fill(t, subject.identifier, subject.class_noun) for t in templates for _ in range(repeat)],
            [fill(t, None, subject.class_noun) for t in templates for _ in range(repeat)],
            [
                fill(bank[i % len(bank)], subject.identifier, subject.class_noun)
                for i in range(params.variance_samples)
            ],
        )


@dataclass(frozen=True)
class Draw:
    """Prompts to sample, one seed each; `label` names the progress bar."""

    label: str
    prompts: list[str]
    seeds: list[int]


def pair_supervisors(
    subject_dirs: Sequence[str | Path], supervisor_dirs: Sequence[str | Path], params: EvalParams
) -> list[SubjectRun]:
    """Each subject with the supervisor tuned on it (matched by the name in its card)."""
    by_subject = {read_adapter_card(d, "supervisor").subjects[0].name: Path(d) for d in supervisor_dirs}
    runs = []
    for subject_dir in subject_dirs:
        name = load_subject(subject_dir)[0].name
        if name not in by_subject:
            raise ValueError(
                f"no supervisor was tuned on subject {name!r} (have: {', '.join(sorted(by_subject))})"
            )
        runs.append(SubjectRun.of(subject_dir, by_subject[name], params))
    return runs


def evaluate(
    subject_dirs: str | Path | Sequence[str | Path],
    supervisor_dirs: str | Path | Sequence[str | Path],
    student_dir: str | Path,
    out_dir: str | Path,
    params: EvalParams,
    tracker: Tracker | None = None,
    device: torch.device | None = None,
) -> dict:
    """Sample the student and each subject's supervisor on the subject's prompts, score them,
    and write samples, `evaluation.json` and `report.html` (with `variance.png` when
    `variance_samples` is set) to `out_dir`.

    Several subjects (a multi-subject student) are scored one by one; the run's `metrics`
    are their means (a model's over the subjects it was sampled on: a black-box supervisor,
    known only by its imported images, cannot draw the evaluation prompts). The encoders load
    first, so a bad encoder source fails before any sampling. Returns the evaluation."""
    tracker = tracker or Tracker()
    device = device or default_device()
    runs = pair_supervisors(_as_list(subject_dirs), _as_list(supervisor_dirs), params)
    tracker.log_params(params.model_dump())
    encoders = Encoders.load(params, device)
    log.info("encoders: %s", encoders.describe())
    tracker.log_params({"encoders": encoders.describe()})

    all_prompts = [p for run in runs for p in run.prompts]
    if len(all_prompts) > VARIANCE_SEED:
        raise ValueError(f"{len(all_prompts)} metric samples would reuse the variance samples' seeds")
    variance_seeds = [params.seed + VARIANCE_SEED + i for i in range(params.variance_samples)]
    student_draws = [
        Draw("student samples", all_prompts, [params.seed + i for i in range(len(all_prompts))]),
        Draw(
            "student variance samples",
            [p for run in runs for p in run.variance_prompts],
            variance_seeds * len(runs),
        ),
    ]
    (student_images, student_spread), student_card, sampling = _sample_student(
        student_dir, student_draws, params, device
    )
    _release(device)
    samples, spread_samples, cards = [], [], []
    offset, count = 0, params.variance_samples
    for i, run in enumerate(runs):
        images = {"student": student_images[offset : offset + len(run.prompts)]}
        spread = {"student": student_spread[i * count : (i + 1) * count]}
        card = read_adapter_card(run.supervisor_dir, "supervisor")
        if card.imported:
            log.info("%s: the supervisor is a black box (imported images); not sampled", run.subject.name)
        else:
            draws = [
                Draw("supervisor samples", run.prompts, [params.seed + j for j in range(len(run.prompts))]),
                Draw("supervisor variance samples", run.variance_prompts, variance_seeds),
            ]
            (images["supervisor"], spread["supervisor"]), card = _sample_supervisor(
                run.supervisor_dir, draws, params, device
            )
            _release(device)
        samples.append(images)
        spread_samples.append(spread)
        cards.append({"student": student_card, "supervisor": card})
        offset += len(run.prompts)

    results, spreads = [], {}
    for run, images, spread in zip(runs, samples, spread_samples, strict=True):
        references = References.of(encoders, run.photos)
        results.append(_score(encoders, run, references, images, params))
        if count:
            spreads[run.subject.name] = {
                model: Spread.of(encoders.dino.embed_images(spread[model]), references.dino)
                for model in spread
            }
            results[-1]["variance"] = {model: s.summary() for model, s in spreads[run.subject.name].items()}
    metrics = _means([r["metrics"] for r in results])
    _log_scores(tracker, metrics, results, "metrics")

    evaluation = {
        "subjects": results,
        "metrics": metrics,
        "protocol": PROTOCOL,
        "encoders": encoders.describe(),
        "student": {
            "backend": student_card.backend,
            "adapter_sha256": student_card.adapter_sha256,
            "sampling": sampling.model_dump(),
        },
    }
    if count:
        evaluation["variance"] = {
            "samples": count,
            "first_seed": variance_seeds[0],
            "features": params.dino_encoder,
            "centroid": CENTROID,
            "means": _means([r["variance"] for r in results]),
        }
        _log_scores(tracker, evaluation["variance"]["means"], results, "variance")
    with atomic_directory(out_dir) as tmp:
        for result, images in zip(results, samples, strict=True):
            for sample in result["samples"]:
                (tmp / sample["file"]).parent.mkdir(parents=True, exist_ok=True)
                images[sample["model"]][sample["index"]].save(tmp / sample["file"])
        atomic_write_json(tmp / EVALUATION_FILE, evaluation)
        atomic_write_text(tmp / COMPARISON_FILE, markdown_table(metrics))
        if spreads:
            plot_variance(tmp / VARIANCE_PLOT, spreads)
        write_report(
            tmp / "report.html", runs, evaluation, samples, cards, tmp / VARIANCE_PLOT if spreads else None
        )
    tracker.log_artifact(Path(out_dir) / "report.html")
    tracker.log_artifact(Path(out_dir) / EVALUATION_FILE)
    tracker.log_artifact(Path(out_dir) / COMPARISON_FILE)
    if spreads:
        tracker.log_artifact(Path(out_dir) / VARIANCE_PLOT)
    return evaluation


def _means(per_subject: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Each model's scores averaged over the subjects it was sampled on."""
    means = {}
    for model in MODELS:
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


def _score(
    encoders: Encoders,
    run: SubjectRun,
    references: References,
    images: dict[str, list[Image.Image]],
    params: EvalParams,
) -> dict:
    """One subject's scores, totals and per prompt, and where its samples go, for the models
    sampled (a black-box supervisor is not)."""
    features = {model: Features.of(encoders, images[model], run.clean) for model in images}
    k = params.images_per_prompt
    name = run.subject.name
    return {
        "subject": name,
        "class_noun": run.subject.class_noun,
        "identifier": run.subject.identifier,
        "metrics": {model: features[model].scores(references) for model in images},
        "per_prompt": {
            model: [
                {"prompt": t, **features[model].scores(references, slice(p * k, (p + 1) * k))}
                for p, t in enumerate(run.templates)
            ]
            for model in images
        },
        "samples": [
            {"model": m, "index": i, "file": f"{name}/{m}/{i:03d}.png", "prompt": run.prompts[i]}
            for m in images
            for i in range(len(run.prompts))
        ],
    }


def _as_list(dirs: str | Path | Sequence[str | Path]) -> list[str | Path]:
    return [dirs] if isinstance(dirs, str | Path) else list(dirs)


def _sample_student(
    adapter_dir: str | Path, draws: Sequence[Draw], params: EvalParams, device: torch.device
) -> tuple[list[list[Image.Image]], AdapterCard, Sampling]:
    """The student's images for each draw, from one load."""
    backend, card = load_student(adapter_dir, device)
    sampling = backend.sampling.override(**params.student_sampling)
    log.info("student sampling: %s", sampling)

    def generate(batch: list[str], seeds: list[int]) -> list[Image.Image]:
        return backend.generate(batch, seeds, sampling, params.batch_size)

    return [_in_batches(draw, params.batch_size, generate) for draw in draws], card, sampling


def _sample_supervisor(
    adapter_dir: Path, draws: Sequence[Draw], params: EvalParams, device: torch.device
) -> tuple[list[list[Image.Image]], AdapterCard]:
    """The supervisor's images for each draw, from one load."""
    backend, card = load_supervisor(adapter_dir, device)
    steps, guidance = backend.generation(params.supervisor_inference_steps, params.supervisor_guidance_scale)

    def generate(batch: list[str], seeds: list[int]) -> list[Image.Image]:
        return backend.generate(batch, seeds, steps, guidance)

    return [_in_batches(draw, params.batch_size, generate) for draw in draws], card


def _in_batches(
    draw: Draw, size: int, generate: Callable[[list[str], list[int]], list[Image.Image]]
) -> list[Image.Image]:
    images: list[Image.Image] = []
    starts = range(0, len(draw.prompts), size)
    for start in tqdm(starts, desc=draw.label, mininterval=2.0, disable=not draw.prompts):
        images += generate(draw.prompts[start : start + size], draw.seeds[start : start + size])
    return images


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def read_evaluation(samples_dir: str | Path) -> dict:
    return read_json(Path(samples_dir) / EVALUATION_FILE)
