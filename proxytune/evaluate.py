"""Evaluation: the student beside its supervisor, the direct-tuning baseline and the untuned
base model (`EvalParams.methods`) on DreamBench prompts, CLIP-I / CLIP-T / DINO.

Every method draws the same prompts with the same seeds. Reference features are computed
once per subject and shared by all methods; each model is loaded, sampled and released in
turn so only one generator is in memory at a time. A multi-subject student is evaluated on
every subject it learnt, each beside its own supervisor; the run's metrics are the means over
subjects. With `variance_samples`, each method also draws that many samples per subject on
varied prompts for the feature-variance analysis (`proxytune.variance`, the supplementary's
Fig. 1). The comparison (`proxytune.report`) gives the student's gain over each other method
and, with the published encoders and backends, the paper's numbers (`proxytune.paper`)."""

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
from proxytune.config import EVAL_METHODS, EvalParams
from proxytune.contracts import EVALUATION_FILE, AdapterCard, Subject, read_adapter_card
from proxytune.fsutil import atomic_directory, atomic_write_json, atomic_write_text, read_json
from proxytune.ingest import load_subject
from proxytune.metrics import PROTOCOL, flat_gains, gains, mean_paired_cosine, mean_pairwise_cosine
from proxytune.paper import reported_rows
from proxytune.prompts import dreambench_prompts, fill
from proxytune.registry import ENCODERS
from proxytune.report import comparison_markdown, write_report
from proxytune.sampling import Sampling
from proxytune.student import load_base_student, load_student
from proxytune.supervisor import load_supervisor
from proxytune.tracking import Tracker
from proxytune.variance import Spread, plot_variance

log = logging.getLogger(__name__)
AR_METHODS = ("student", "direct", "base")  # sampled by the AR model, from one load each
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
    supervisor: AdapterCard
    templates: list[str]
    prompts: list[str]  # with the identifier, one per image
    clean: list[str]  # without it, for CLIP-T
    variance_prompts: list[str]  # the whole DreamBench list, cycled, one per variance sample

    @classmethod
    def of(
        cls, subject_dir: str | Path, supervisor_dir: Path, supervisor: AdapterCard, params: EvalParams
    ) -> SubjectRun:
        subject, photos = load_subject(subject_dir)
        templates = dreambench_prompts(subject.class_noun, params.num_prompts)
        repeat = params.images_per_prompt
        bank = dreambench_prompts(subject.class_noun)
        return cls(
            subject,
            photos,
            supervisor_dir,
            supervisor,
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


@dataclass
class Drawn:
    """What the sampling produced, per subject: images by method (the metric samples and the
    variance samples) and the cards of the adapters that drew them."""

    samples: list[dict[str, list[Image.Image]]]
    spread: list[dict[str, list[Image.Image]]]
    cards: list[dict[str, AdapterCard]]
    sampling: Sampling | None = None  # the AR methods' sampling settings


def pair_supervisors(
    subject_dirs: Sequence[str | Path], supervisor_dirs: Sequence[str | Path], params: EvalParams
) -> list[SubjectRun]:
    """Each subject with the supervisor tuned on it (matched by the name in its card)."""
    cards = [(Path(d), read_adapter_card(d, "supervisor")) for d in supervisor_dirs]
    by_subject = {card.subjects[0].name: (d, card) for d, card in cards}
    runs = []
    for subject_dir in subject_dirs:
        name = load_subject(subject_dir)[0].name
        if name not in by_subject:
            raise ValueError(
                f"no supervisor was tuned on subject {name!r} (have: {', '.join(sorted(by_subject))})"
            )
        runs.append(SubjectRun.of(subject_dir, *by_subject[name], params))
    return runs


def ar_adapters(
    methods: Sequence[str], student_dir: str | Path, direct_dir: str | Path | None
) -> dict[str, tuple[Path, AdapterCard]]:
    """The tuned AR adapters to sample, by method; the direct baseline must be the student's
    backend tuned on the same subjects, or the comparison would not be like for like."""
    student = read_adapter_card(student_dir, "student")
    adapters = {"student": (Path(student_dir), student)}
    if "direct" not in methods:
        return adapters
    if direct_dir is None:
        raise ValueError("evaluation.methods lists direct, but no direct-tuned adapter was given")
    direct = read_adapter_card(direct_dir, "student")
    if direct.backend != student.backend or direct.subjects != student.subjects:
        raise ValueError(
            f"{direct_dir}: the direct baseline ({direct.backend}, {[s.name for s in direct.subjects]}) "
            f"does not match the student ({student.backend}, {[s.name for s in student.subjects]})"
        )
    adapters["direct"] = (Path(direct_dir), direct)
    return adapters


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

    `direct_dir`: the direct baseline's adapter (`proxytune.baseline`), needed when the methods
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
        results.append(_score(encoders, run, references, images, params))
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


def draw(
    runs: Sequence[SubjectRun],
    adapters: dict[str, tuple[Path, AdapterCard]],
    params: EvalParams,
    device: torch.device,
) -> Drawn:
    """Sample every method, one model in memory at a time: each AR method (student, direct,
    base) on all subjects' prompts from one load, then each subject's supervisor. Metric sample
    j of a subject has seed `params.seed + j` and variance sample i `params.seed + VARIANCE_SEED
    + i`, for every method alike."""
    drawn = Drawn([{} for _ in runs], [{} for _ in runs], [{} for _ in runs])
    variance_seeds = [params.seed + VARIANCE_SEED + i for i in range(params.variance_samples)]
    prompts = [p for run in runs for p in run.prompts]
    count = params.variance_samples
    for method in (m for m in AR_METHODS if m in params.methods):
        draws = [
            Draw(f"{method} samples", prompts, [params.seed + i for i in range(len(prompts))]),
            Draw(
                f"{method} variance samples",
                [p for run in runs for p in run.variance_prompts],
                variance_seeds * len(runs),
            ),
        ]
        (images, spread), card, drawn.sampling = _sample_ar(method, adapters, draws, params, device)
        _release(device)
        offset = 0
        for i, run in enumerate(runs):
            drawn.samples[i][method] = images[offset : offset + len(run.prompts)]
            drawn.spread[i][method] = spread[i * count : (i + 1) * count]
            if method != "base":
                drawn.cards[i][method] = card
            offset += len(run.prompts)
    for i, run in enumerate(runs):
        drawn.cards[i]["supervisor"] = run.supervisor
        if "supervisor" not in params.methods:
            continue
        if run.supervisor.imported:
            log.info("%s: the supervisor is a black box (imported images); not sampled", run.subject.name)
            continue
        draws = [
            Draw("supervisor samples", run.prompts, [params.seed + j for j in range(len(run.prompts))]),
            Draw("supervisor variance samples", run.variance_prompts, variance_seeds),
        ]
        drawn.samples[i]["supervisor"], drawn.spread[i]["supervisor"] = _sample_supervisor(
            run.supervisor_dir, draws, params, device
        )
        _release(device)
    return drawn


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
        "references": [f"{name}/reference/{i:02d}.png" for i in range(len(run.photos))],
    }


def _as_list(dirs: str | Path | Sequence[str | Path]) -> list[str | Path]:
    return [dirs] if isinstance(dirs, str | Path) else list(dirs)


def _sample_ar(
    method: str,
    adapters: dict[str, tuple[Path, AdapterCard]],
    draws: Sequence[Draw],
    params: EvalParams,
    device: torch.device,
) -> tuple[list[list[Image.Image]], AdapterCard, Sampling]:
    """One AR method's images for each draw, from one load: the student or the direct baseline
    with its adapter, or (`base`) the student's base model without one; all with the student's
    sampling settings."""
    if method == "base":
        card = adapters["student"][1]
        backend = load_base_student(card, device)
    else:
        backend, card = load_student(adapters[method][0], device)
    sampling = backend.sampling.override(**params.student_sampling)
    log.info("%s sampling: %s", method, sampling)

    def generate(batch: list[str], seeds: list[int]) -> list[Image.Image]:
        return backend.generate(batch, seeds, sampling, params.batch_size)

    return [_in_batches(draw, params.batch_size, generate) for draw in draws], card, sampling


def _sample_supervisor(
    adapter_dir: Path, draws: Sequence[Draw], params: EvalParams, device: torch.device
) -> list[list[Image.Image]]:
    """The supervisor's images for each draw, from one load."""
    backend, _ = load_supervisor(adapter_dir, device)
    steps, guidance = backend.generation(params.supervisor_inference_steps, params.supervisor_guidance_scale)

    def generate(batch: list[str], seeds: list[int]) -> list[Image.Image]:
        return backend.generate(batch, seeds, steps, guidance)

    return [_in_batches(draw, params.batch_size, generate) for draw in draws]


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
