"""The evaluation's scores: CLIP-I, CLIP-T and DINO of one subject's samples against its
reference photos, totals and per prompt. The encoders load once per evaluation, the
references' features are computed once per subject, and each method's samples are embedded
once for both its totals and its per-prompt scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from proxytune.analysis.metrics import mean_paired_cosine, mean_pairwise_cosine
from proxytune.backends._base import ImageEncoder, ModelSource
from proxytune.core.params import EvalParams
from proxytune.core.registry import ENCODERS
from proxytune.stages.eval_draw import SubjectRun


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


def score_subject(
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
