"""The DreamBench-wide table: the paper's means per method over subjects, the student's gains,
and one row per subject and method, from one evaluation per subject (`bench.json`, `bench.md`,
`bench.html`). Which subjects a DreamBench-wide run plans is `proxytune.stages.dreambench`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proxytune.analysis.metrics import gains
from proxytune.analysis.report import METHOD_TITLES, METRIC_LABELS, bench_page, markdown_table, random_note
from proxytune.core.fsutil import atomic_directory, atomic_write_json, atomic_write_text, read_json

BENCH_FILE = "bench.json"
TABLE_FILE = "bench.md"
REPORT_FILE = "bench.html"


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
