"""The paper's reported DreamBench numbers (Wu et al., arXiv 2503.10125), kept as data, shown
beside a run's own scores when the run used the same models, so a user sees at once how far a reproduction is.

A reported row applies when the run used the published evaluation encoders (CLIP ViT-B/32,
DINO ViT-S/16) and the row's method, AR family and supervisor backend; rows that describe
no run's method (real images, full fine-tuning) are shown as context whenever the encoders
match. Numbers are raw cosines over all (generated, real) pairs, as proxytune computes them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

PUBLISHED_ENCODERS = {"clip": "clip-vit-b32", "dino": "dino-vits16"}


@dataclass(frozen=True)
class Reported:
    label: str
    clip_i: float
    clip_t: float | None
    dino: float
    source: str
    method: str | None = None  # the evaluation method it compares with; None: context only
    student_family: str | None = None  # prefix of the AR student backend's name
    supervisor: str | None = None  # the supervisor backend

    def applies(self, method: str, student: str, supervisors: set[str]) -> bool:
        return (
            self.method == method
            and (self.student_family is None or student.startswith(self.student_family))
            and (self.supervisor is None or supervisors == {self.supervisor})
        )

    def scores(self) -> dict[str, float | None]:
        return {k: v for k, v in asdict(self).items() if k in ("clip_i", "clip_t", "dino")}


LUMINA = "lumina-mgpt"
REPORTED = (
    Reported("Real images", 0.885, None, 0.774, "DreamBooth paper via CoAR"),
    Reported("DreamBooth, SD (full fine-tuning)", 0.803, 0.305, 0.668, "DreamBooth paper"),
    Reported("Lumina-mGPT tuned directly, LoRA", 0.6752, 0.2956, 0.5088, "secondary", "direct", LUMINA),
    Reported(
        "SDXL supervisor (DreamBooth-LoRA)", 0.8002, 0.3225, 0.7272, "secondary", "supervisor", None, "sdxl"
    ),
    Reported(
        "Lumina-mGPT + Proxy-Tuning (SDXL)", 0.8074, 0.3118, 0.7834, "secondary", "student", LUMINA, "sdxl"
    ),
    Reported(
        "Lumina-mGPT + Proxy-Tuning (SD3)", 0.7977, 0.3167, 0.7551, "secondary", "student", LUMINA, "sd3"
    ),
    Reported(
        "Lumina-mGPT + Proxy-Tuning (SD3.5)",
        0.8091,
        0.3123,
        0.7523,
        "CoAR table",
        "student",
        LUMINA,
        "sd3.5-large",
    ),
)


def reported_rows(
    methods: Iterable[str], student: str, supervisors: set[str], encoders: dict[str, str]
) -> list[dict]:
    """The reported rows that apply to a run: its `methods`, its student backend, the set of its
    supervisor backends and its encoder backends (`{"clip": ..., "dino": ...}`); [] when the
    encoders are not the published ones (scores from other encoders are not comparable)."""
    if encoders != PUBLISHED_ENCODERS:
        return []
    methods = list(methods)
    rows = [
        r for r in REPORTED if r.method is None or any(r.applies(m, student, supervisors) for m in methods)
    ]
    return [{"label": r.label, "method": r.method, "source": r.source, **r.scores()} for r in rows]
