"""The evaluation's samples: every method (`EvalParams.methods`) draws each subject's prompts
with the same seeds, one model in memory at a time, plus the variance samples of the
feature-spread analysis."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from proxytune.backends._tuned import load_base_student, load_student, load_supervisor
from proxytune.core.contracts import AdapterCard, Subject, read_adapter_card
from proxytune.core.params import EvalParams, Sampling
from proxytune.core.prompts import dreambench_prompts, fill
from proxytune.stages.ingest import load_subject

log = logging.getLogger(__name__)
AR_METHODS = ("student", "direct", "base")  # sampled by the AR model, from one load each
# Variance samples draw seeds params.seed + VARIANCE_SEED + i, the same for every subject and
# model whatever the metric settings, and apart from the metric samples' params.seed + i.
VARIANCE_SEED = 1_000_000


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
