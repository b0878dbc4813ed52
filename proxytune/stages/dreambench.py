"""A DreamBench-layout dataset as the planned subjects of a DreamBench-wide run.

A dataset is a folder (or `s3://` prefix) with one folder of photos per subject and
`prompts_and_classes.txt`, whose `subject_name,class` lines give each subject's class noun
(google/dreambooth's layout). Subjects listed without a folder are skipped (a partial copy,
such as examples' dreambench-mini, is a valid dataset); `--subjects` must name subjects that
are both listed and present. Each subject gets its own supervisor, student and direct baseline
with identifier `sks`, as in the paper. The methods are student, supervisor and direct unless
the preset or `--set evaluation.methods=...` says otherwise (the compiled pipeline's
`overrides` default carries them). The table of results is `proxytune.analysis.bench`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proxytune.core.config import PRESETS
from proxytune.stages.ingest import IngestError, list_sources, plan_subjects

log = logging.getLogger(__name__)
CLASSES_FILE = "prompts_and_classes.txt"
CLASSES_HEADER = "subject_name,class"
BENCH_METHODS = ["student", "supervisor", "direct"]


def with_bench_methods(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` with the bench's methods (student, supervisor, direct) unless the preset or
    an override sets `evaluation.methods` (either spelling: dotted or nested)."""
    nested = overrides.get("evaluation", {})
    set_here = "evaluation.methods" in overrides or (isinstance(nested, dict) and "methods" in nested)
    if set_here or "methods" in PRESETS.get(preset, {}).get("evaluation", {}):
        return dict(overrides)
    return {**overrides, "evaluation.methods": BENCH_METHODS}


def read_classes(text: str) -> dict[str, str]:
    """`subject_name,class` lines (after that header, up to the first blank line) -> {name: class}."""
    lines = [line.strip() for line in text.splitlines()]
    if CLASSES_HEADER not in lines:
        raise ValueError(f"{CLASSES_FILE} has no '{CLASSES_HEADER}' header line")
    classes: dict[str, str] = {}
    for line in lines[lines.index(CLASSES_HEADER) + 1 :]:
        if not line:
            break
        name, sep, noun = line.partition(",")
        if not sep or not name.strip() or not noun.strip():
            raise ValueError(f"{CLASSES_FILE}: {line!r} is not a 'subject_name,class' line")
        classes[name.strip()] = noun.strip()
    if not classes:
        raise ValueError(f"{CLASSES_FILE} lists no subjects under '{CLASSES_HEADER}'")
    return classes


def bench_subjects(dataset_uri: str, names: Sequence[str] = ()) -> list[dict[str, str]]:
    """The planned subjects of a DreamBench-layout dataset (`names`: only these), each with
    identifier `sks`; raises ValueError naming what is missing."""
    files = {f.name: f for f in list_sources(dataset_uri, "dataset")}
    if CLASSES_FILE not in files:
        raise IngestError(f"{dataset_uri} has no {CLASSES_FILE} (DreamBench's subject_name,class list)")
    classes = read_classes(files[CLASSES_FILE].read().decode("utf-8"))
    present = [name for name in classes if _has_files(_child(dataset_uri, name))]
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not listed in {CLASSES_FILE}")
    absent = [n for n in names if n not in present]
    if absent:
        raise ValueError(
            f"{', '.join(absent)}: listed in {CLASSES_FILE} but no photo folder in {dataset_uri}"
        )
    chosen = list(names) or present
    if not chosen:
        raise ValueError(f"{dataset_uri}: none of the {len(classes)} subjects listed has a photo folder")
    skipped = len(classes) - len(present)
    if skipped and not names:
        log.info("%d listed subject(s) have no folder in %s; skipped", skipped, dataset_uri)
    return [
        plan_subjects([{"uri": _child(dataset_uri, n), "class_noun": classes[n], "name": n}])[0]
        for n in chosen
    ]


def _child(uri: str, name: str) -> str:
    return f"{uri.rstrip('/')}/{name}" if uri.startswith("s3://") else str(Path(uri) / name)


def _has_files(uri: str) -> bool:
    """Whether a listed subject has a folder with files; a folder that breaks the ingest rules
    (a link outside it) fails here, naming it, rather than passing for absent."""
    return (uri.startswith("s3://") or Path(uri).is_dir()) and bool(list_sources(uri))
