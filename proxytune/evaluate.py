"""Evaluation: student and supervisor on DreamBench prompts, CLIP-I / CLIP-T / DINO.

Reference features are computed once and shared by both models; each model is loaded,
sampled and released in turn so only one generator is in memory at a time.
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
from proxytune.contracts import EVALUATION_FILE, AdapterCard
from proxytune.fsutil import atomic_directory, atomic_write_json, read_json
from proxytune.ingest import load_subject
from proxytune.metrics import PROTOCOL, mean_paired_cosine, mean_pairwise_cosine
from proxytune.prompts import dreambench_prompts, fill
from proxytune.registry import ENCODERS
from proxytune.report import write_report
from proxytune.student import load_student
from proxytune.supervisor import load_supervisor
from proxytune.tracking import Tracker

log = logging.getLogger(__name__)
MODELS = ("student", "supervisor")
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


def evaluate(
    subject_dir: str | Path,
    supervisor_dir: str | Path,
    student_dir: str | Path,
    out_dir: str | Path,
    params: EvalParams,
    tracker: Tracker | None = None,
    device: torch.device | None = None,
) -> dict:
    """Sample both models on the prompts, score them, write samples, evaluation.json and
    report.html to `out_dir`; returns the evaluation (metrics under "metrics")."""
    tracker = tracker or Tracker()
    device = device or default_device()
    subject, photos = load_subject(subject_dir)
    templates = dreambench_prompts(subject.class_noun, params.num_prompts)
    prompts = [
        fill(t, subject.identifier, subject.class_noun)
        for t in templates
        for _ in range(params.images_per_prompt)
    ]
    clean = [fill(t, None, subject.class_noun) for t in templates for _ in range(params.images_per_prompt)]
    tracker.log_params(params.model_dump())

    samplers: dict[str, Callable[[], Samples]] = {
        "student": lambda: _sample_student(student_dir, prompts, params, device),
        "supervisor": lambda: _sample_supervisor(supervisor_dir, prompts, params, device),
    }
    samples, cards = {}, {}
    for model in MODELS:
        samples[model], cards[model] = samplers[model]()
        _release(device)

    encoders = Encoders.load(params, device)
    references = References.of(encoders, photos)
    features = {model: Features.of(encoders, samples[model], clean) for model in MODELS}
    metrics = {model: features[model].scores(references) for model in MODELS}
    k = params.images_per_prompt
    per_prompt = {
        model: [
            {"prompt": t, **features[model].scores(references, slice(p * k, (p + 1) * k))}
            for p, t in enumerate(templates)
        ]
        for model in MODELS
    }
    for model in MODELS:
        log.info("%s: %s", model, ", ".join(f"{k} {v:.4f}" for k, v in metrics[model].items()))
        tracker.log_metrics({f"{model}_{k}": v for k, v in metrics[model].items()})

    evaluation = {
        "subject": subject.name,
        "class_noun": subject.class_noun,
        "identifier": subject.identifier,
        "metrics": metrics,
        "per_prompt": per_prompt,
        "protocol": PROTOCOL,
        "encoders": {"clip": params.clip_encoder, "dino": params.dino_encoder},
        "models": {
            m: {"backend": cards[m].backend, "adapter_sha256": cards[m].adapter_sha256} for m in MODELS
        },
        "samples": [
            {"model": m, "file": f"{m}/{i:03d}.png", "prompt": prompts[i]}
            for m in MODELS
            for i in range(len(prompts))
        ],
    }
    with atomic_directory(out_dir) as tmp:
        for model in MODELS:
            (tmp / model).mkdir()
            for i, image in enumerate(samples[model]):
                image.save(tmp / model / f"{i:03d}.png")
        atomic_write_json(tmp / EVALUATION_FILE, evaluation)
        write_report(tmp / "report.html", subject, photos, evaluation, samples, cards)
    tracker.log_artifact(Path(out_dir) / "report.html")
    tracker.log_artifact(Path(out_dir) / EVALUATION_FILE)
    return evaluation


def _sample_student(adapter_dir, prompts: list[str], params: EvalParams, device) -> Samples:
    backend, card = load_student(adapter_dir, device)
    sampling = backend.sampling.override(**params.student_sampling)
    log.info("student sampling: %s", sampling)

    def generate(batch: list[str], start: int) -> list[Image.Image]:
        seeds = [params.seed + start + i for i in range(len(batch))]
        return backend.generate(batch, seeds, sampling, params.batch_size)

    return _in_batches(prompts, params.batch_size, "student samples", generate), card


def _sample_supervisor(adapter_dir, prompts: list[str], params: EvalParams, device) -> Samples:
    backend, card = load_supervisor(adapter_dir, device)

    def generate(batch: list[str], start: int) -> list[Image.Image]:
        seeds = [params.seed + start + i for i in range(len(batch))]
        steps, guidance = params.supervisor_inference_steps, params.supervisor_guidance_scale
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
