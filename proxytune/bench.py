"""DreamBench-wide evaluation: the protocol over every subject of a DreamBench-layout dataset,
and the paper's table of means with per-subject rows.

A dataset is a folder (or `s3://` prefix) with one folder of photos per subject and
`prompts_and_classes.txt`, whose `subject_name,class` lines give each subject's class noun
(google/dreambooth's layout). Subjects listed without a folder are skipped (a partial copy,
such as examples' dreambench-mini, is a valid dataset); `--subjects` must name subjects that
are both listed and present. Each subject gets its own supervisor, student and direct baseline
with identifier `sks`, as in the paper; the means are over subjects, per method. The methods
are student, supervisor and direct unless the preset or `--set evaluation.methods=...` says
otherwise (the compiled pipeline's `overrides` default carries them).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proxytune.config import PRESETS
from proxytune.fsutil import atomic_directory, atomic_write_json, atomic_write_text, read_json
from proxytune.ingest import IngestError, list_sources, plan_subjects
from proxytune.metrics import gains
from proxytune.report import METHOD_TITLES, METRIC_LABELS, bench_page, markdown_table, random_note

log = logging.getLogger(__name__)
CLASSES_FILE = "prompts_and_classes.txt"
CLASSES_HEADER = "subject_name,class"
BENCH_METHODS = ["student", "supervisor", "direct"]
BENCH_FILE = "bench.json"
TABLE_FILE = "bench.md"
REPORT_FILE = "bench.html"


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


def aggregate(evaluation_dirs: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """The bench table from one evaluation per subject: every subject's scores per method, the
    means over subjects (each method's over the subjects it was scored on), the student's gains
    over the other methods' means and the paper's numbers where they apply. Writes
    `bench.json`, `bench.md` and `bench.html` to `out_dir`; returns the table."""
    evaluations = [read_json(Path(d) / "evaluation.json") for d in evaluation_dirs]
    if not evaluations:
        raise ValueError("no evaluations to aggregate")
    rows = [
        {"subject": s["subject"], "class_noun": s["class_noun"], "metrics": s["metrics"]}
        for evaluation in evaluations
        for s in evaluation["subjects"]
    ]
    rows.sort(key=lambda row: row["subject"])
    methods = [m for m in METHOD_TITLES if any(m in row["metrics"] for row in rows)]
    means = {
        method: {
            key: sum(r["metrics"][method][key] for r in scored) / len(scored) for key, _ in METRIC_LABELS
        }
        for method in methods
        if (scored := [r for r in rows if method in r["metrics"]])
    }
    table = {
        "subjects": rows,
        "means": means,
        "counts": {m: sum(m in r["metrics"] for r in rows) for m in methods},
        "gains": gains(means),
        "reported": evaluations[0]["reported"],
        "protocol": evaluations[0]["protocol"],
        "encoders": evaluations[0]["encoders"],
        **({"random_weights": e} if (e := evaluations[0].get("random_weights")) else {}),
    }
    markdown = bench_markdown(table)
    with atomic_directory(out_dir) as tmp:
        atomic_write_json(tmp / BENCH_FILE, table)
        atomic_write_text(tmp / TABLE_FILE, markdown)
        atomic_write_text(tmp / REPORT_FILE, bench_page(table))
    return table


def bench_markdown(table: dict[str, Any]) -> str:
    """The means (the paper's table), then one row per subject and method."""
    note = random_note(table)
    lines = [
        *([f"> {note}", ""] if note else []),
        f"Means over {len(table['subjects'])} subject(s):",
        "",
        markdown_table(table["means"], table["reported"]).rstrip("\n"),
        "",
        "| subject | class | method | " + " | ".join(label for _, label in METRIC_LABELS) + " |",
        "|---|---|---|" + "---:|" * len(METRIC_LABELS),
    ]
    for row in table["subjects"]:
        for method in (m for m in METHOD_TITLES if m in row["metrics"]):
            scores = row["metrics"][method]
            cells = " | ".join(f"{scores[k]:.4f}" for k, _ in METRIC_LABELS)
            lines.append(f"| {row['subject']} | {row['class_noun']} | {method} | {cells} |")
    return "\n".join(lines) + "\n"
