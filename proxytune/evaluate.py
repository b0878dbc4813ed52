"""Evaluation: student and supervisor on DreamBench prompts, CLIP-I / CLIP-T / DINO.

Reference features are computed once per subject and shared by both models; each model is
loaded, sampled and released in turn so only one generator is in memory at a time. A
multi-subject student is evaluated on every subject it learnt, each beside its own
supervisor; the run's metrics are the means over subjects.
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

from proxytune.backends._base import ImageEncoder, default_device
from proxytune.config import EvalParams
from proxytune.contracts import EVALUATION_FILE, AdapterCard, Subject, read_adapter_card
from proxytune.fsutil import atomic_directory, atomic_write_json, read_json
from proxytune.ingest import load_subject
from proxytune.metrics import PROTOCOL, mean_paired_cosine, mean_pairwise_cosine
from proxytune.prompts import dreambench_prompts, fill
from proxytune.registry import ENCODERS
from proxytune.report import write_report
from proxytune.sampling import Sampling
from proxytune.student import load_student
from proxytune.supervisor import load_supervisor
from proxytune.tracking import Tracker

log = logging.getLogger(__name__)
MODELS = ("student", "supervisor")
METRICS = ("clip_i", "clip_t", "dino")
Samples = tuple[list[Image.Image], AdapterCard]


@dataclass
class Encoders:
    clip: ImageEncoder
    dino: ImageEncoder

    @classmethod
    def load(cls, params: EvalParams, device: torch.device) -> Encoders:
        encoders = cls(ENCODERS.create(params.clip_encoder), ENCODERS.create(params.dino_encoder))
        encoders.clip.load(device)
        encoders.dino.load(device)
        return encoders


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

    @classmethod
    def of(cls, subject_dir: str | Path, supervisor_dir: Path, params: EvalParams) -> SubjectRun:
        subject, photos = load_subject(subject_dir)
        templates = dreambench_prompts(subject.class_noun, params.num_prompts)
        repeat = params.images_per_prompt
        return cls(
            subject,
            photos,
            supervisor_dir,
            templates,
            [fill(t, subject.identifier, subject.class_noun) for t in templates for _ in range(repeat)],
            [fill(t, None, subject.class_noun) for t in templates for _ in range(repeat)],
        )


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
    and write samples, `evaluation.json` and `report.html` to `out_dir`.

    Several subjects (a multi-subject student) are scored one by one; the run's `metrics`
    are their means (a model's over the subjects it was sampled on: a black-box supervisor,
    known only by its imported images, cannot draw the evaluation prompts). Returns the
    evaluation."""
    tracker = tracker or Tracker()
    device = device or default_device()
    runs = pair_supervisors(_as_list(subject_dirs), _as_list(supervisor_dirs), params)
    tracker.log_params(params.model_dump())

    all_prompts = [p for run in runs for p in run.prompts]
    student_images, student_card, sampling = _sample_student(student_dir, all_prompts, params, device)
    _release(device)
    samples, cards = [], []
    offset = 0
    for run in runs:
        images = {"student": student_images[offset : offset + len(run.prompts)]}
        card = read_adapter_card(run.supervisor_dir, "supervisor")
        if card.imported:
            log.info("%s: the supervisor is a black box (imported images); not sampled", run.subject.name)
        else:
            images["supervisor"], card = _sample_supervisor(run.supervisor_dir, run.prompts, params, device)
            _release(device)
        samples.append(images)
        cards.append({"student": student_card, "supervisor": card})
        offset += len(run.prompts)

    encoders = Encoders.load(params, device)
    results = [_score(encoders, run, images, params) for run, images in zip(runs, samples, strict=True)]
    metrics = {
        m: {k: sum(s[m][k] for s in scored) / len(scored) for k in METRICS}
        for m in MODELS
        if (scored := [r["metrics"] for r in results if m in r["metrics"]])
    }
    for result in results:
        for model, scores in result["metrics"].items():
            log.info(
                "%s %s: %s", result["subject"], model, ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
            )
    tracker.log_metrics({f"{model}_{k}": v for model, scores in metrics.items() for k, v in scores.items()})
    if len(results) > 1:
        tracker.log_metrics(
            {
                f"{r['subject']}.{m}_{k}": v
                for r in results
                for m, scores in r["metrics"].items()
                for k, v in scores.items()
            }
        )

    evaluation = {
        "subjects": results,
        "metrics": metrics,
        "protocol": PROTOCOL,
        "encoders": {"clip": params.clip_encoder, "dino": params.dino_encoder},
        "student": {
            "backend": student_card.backend,
            "adapter_sha256": student_card.adapter_sha256,
            "sampling": sampling.model_dump(),
        },
    }
    with atomic_directory(out_dir) as tmp:
        for result, images in zip(results, samples, strict=True):
            for sample in result["samples"]:
                (tmp / sample["file"]).parent.mkdir(parents=True, exist_ok=True)
                images[sample["model"]][sample["index"]].save(tmp / sample["file"])
        atomic_write_json(tmp / EVALUATION_FILE, evaluation)
        write_report(tmp / "report.html", runs, evaluation, samples, cards)
    tracker.log_artifact(Path(out_dir) / "report.html")
    tracker.log_artifact(Path(out_dir) / EVALUATION_FILE)
    return evaluation


def _score(
    encoders: Encoders, run: SubjectRun, images: dict[str, list[Image.Image]], params: EvalParams
) -> dict:
    """One subject's scores, totals and per prompt, and where its samples go, for the models
    sampled (a black-box supervisor is not)."""
    references = References.of(encoders, run.photos)
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
    adapter_dir, prompts: list[str], params: EvalParams, device
) -> tuple[list, AdapterCard, Sampling]:
    backend, card = load_student(adapter_dir, device)
    sampling = backend.sampling.override(**params.student_sampling)
    log.info("student sampling: %s", sampling)

    def generate(batch: list[str], start: int) -> list[Image.Image]:
        seeds = [params.seed + start + i for i in range(len(batch))]
        return backend.generate(batch, seeds, sampling, params.batch_size)

    return _in_batches(prompts, params.batch_size, "student samples", generate), card, sampling


def _sample_supervisor(adapter_dir, prompts: list[str], params: EvalParams, device) -> Samples:
    backend, card = load_supervisor(adapter_dir, device)

    def generate(batch: list[str], start: int) -> list[Image.Image]:
        seeds = [params.seed + start + i for i in range(len(batch))]
        steps, guidance = backend.generation(
            params.supervisor_inference_steps, params.supervisor_guidance_scale
        )
        return backend.generate(batch, seeds, steps, guidance)

    return _in_batches(prompts, params.batch_size, "supervisor samples", generate), card


def _in_batches(
    prompts: list[str], size: int, desc: str, generate: Callable[[list[str], int], list[Image.Image]]
) -> list[Image.Image]:
    images: list[Image.Image] = []
    for start in tqdm(range(0, len(prompts), size), desc=desc, mininterval=2.0):
        images += generate(prompts[start : start + size], start)
    return images


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def read_evaluation(samples_dir: str | Path) -> dict:
    return read_json(Path(samples_dir) / EVALUATION_FILE)
