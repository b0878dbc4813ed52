"""The files inside each KFP artifact (README, "Artifacts"), as validated models.

Every stage reads its inputs through these, so a malformed or foreign artifact fails with
a message naming the file instead of deep inside a model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from proxytune.core.fsutil import atomic_write_json, atomic_write_text, read_json, sha256_file

SUBJECT_FILE = "subject.json"
CARD_FILE = "proxytune.json"
MANIFEST_FILE = "manifest.jsonl"
PROXY_FILE = "proxy.json"
EVALUATION_FILE = "evaluation.json"
IMPORTED = "imported"  # the supervisor backend of proxy images made elsewhere (a black box)
ADAPTER_ARTIFACT = "adapter"  # the registered pyfunc model's artifact that holds the student adapter

_IDENTIFIER = re.compile(r"^[A-Za-z][A-Za-z0-9_*-]{0,31}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class _Contract(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @classmethod
    def read(cls, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not a proxytune {cls.__name__} artifact")
        try:
            return cls.model_validate(read_json(path))
        except (ValidationError, ValueError) as error:
            raise ValueError(f"{path} is not a valid {cls.__name__}: {error}") from None

    def write(self, path: str | Path) -> None:
        atomic_write_json(path, self.model_dump(mode="json"))


class SubjectImage(_Contract):
    file: str
    sha256: str


class Subject(_Contract):
    """`subject.json` of a subject Dataset (images in `images/NN.png`)."""

    name: str
    class_noun: str
    identifier: str
    source_uri: str
    images: list[SubjectImage] = Field(min_length=1)
    proxy_uri: str | None = Field(None, description="proxy images imported from here instead of drawn")

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"subject name {value!r} must be lower-case letters, digits, '-', '_' or '.'")
        return value

    @field_validator("identifier")
    @classmethod
    def _one_word(cls, value: str) -> str:
        if not _IDENTIFIER.match(value):
            raise ValueError(f"identifier {value!r} must be one word (letters, digits, '_', '*', '-')")
        return value

    @field_validator("class_noun")
    @classmethod
    def _noun(cls, value: str) -> str:
        value = " ".join(value.split())
        if not value:
            raise ValueError("class noun must not be empty")
        return value

    def ref(self) -> SubjectRef:
        return SubjectRef(name=self.name, identifier=self.identifier, class_noun=self.class_noun)


class SubjectRef(_Contract):
    """A subject an adapter was tuned on, and the identifier that calls it up."""

    name: str
    identifier: str
    class_noun: str


class ModelRef(_Contract):
    id: str
    revision: str | None = None
    vq: str | None = None  # a VQ tokenizer released apart from the model (Lumina-mGPT)


class AdapterCard(_Contract):
    """`proxytune.json` beside a supervisor or student adapter; or, with backend `IMPORTED`,
    the card of a black-box supervisor: no weights, `base_model.id` is where its images are."""

    kind: Literal["supervisor", "student"]
    backend: str
    base_model: ModelRef = Field(description="base weights; revision is the resolved hub commit where known")
    subjects: list[SubjectRef] = Field(min_length=1)
    params: dict[str, Any]
    steps_done: int
    losses: list[float]
    loss_before: dict[str, float] = Field(description="evaluation losses by split, before training")
    loss_after: dict[str, float] = Field(description="the same losses after training")
    adapter_files: list[str]
    adapter_sha256: str
    proxytune_version: str

    @property
    def imported(self) -> bool:
        return self.backend == IMPORTED


def read_adapter_card(adapter_dir: str | Path, kind: str) -> AdapterCard:
    """The adapter's card, after checking its kind and the weights' hash."""
    card = AdapterCard.read(Path(adapter_dir) / CARD_FILE)
    if card.kind != kind:
        raise ValueError(f"{adapter_dir} holds a {card.kind} adapter, expected a {kind} adapter")
    if card.imported:
        return card
    weights = Path(adapter_dir) / card.adapter_files[0]
    if not weights.is_file() or sha256_file(weights) != card.adapter_sha256:
        raise ValueError(f"{weights} is missing or does not match the sha256 in {CARD_FILE}")
    return card


class ProxyRecord(_Contract):
    """One line of a proxy Dataset's `manifest.jsonl`."""

    file: str
    prompt: str
    seed: int | None = None  # None: imported, not drawn here
    supervisor: str
    source: str | None = None  # the imported file it came from
    scores: dict[str, float] | None = None
    evaluation_prompt: bool | None = None  # True: the prompt is a DreamBench evaluation prompt


class ProxyInfo(_Contract):
    """`proxy.json`: how a proxy Dataset was made; `key` addresses it in the object store."""

    key: str
    subject: str
    identifier: str
    class_noun: str
    supervisor: str
    params: dict[str, Any]
    num_images: int
    part: list[int] | None = None  # [shard, shards] of a sharded generation; None: the whole dataset
    selection: dict[str, Any] | None = None  # how the images were filtered from those drawn, if they were
    complete: bool = False


def proxy_file(index: int, shard_size: int) -> str:
    """Where proxy image `index` lies in its Dataset: `shard_size` images per shard folder."""
    return f"shard-{index // shard_size:05d}/{index:06d}.png"


def read_manifest(dataset_dir: str | Path) -> list[ProxyRecord]:
    """A proxy Dataset's `manifest.jsonl`, one record per image on disk (none yet: empty)."""
    path = Path(dataset_dir) / MANIFEST_FILE
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ProxyRecord.model_validate_json(line) for line in lines if line.strip()]


def write_manifest_text(records: list[ProxyRecord]) -> str:
    return "".join(json.dumps(r.model_dump(mode="json", exclude_none=True)) + "\n" for r in records)


def write_manifest(dataset_dir: Path, records: list[ProxyRecord]) -> str:
    """Replace the manifest at once (never half-written); returns its text."""
    text = write_manifest_text(records)
    atomic_write_text(dataset_dir / MANIFEST_FILE, text)
    return text
