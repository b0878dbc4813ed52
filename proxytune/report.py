"""The evaluation report: one self-contained HTML page (images inlined), which the Kubeflow
UI renders for the HTML artifact and MLflow shows as a run artifact."""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image

from proxytune.contracts import AdapterCard
from proxytune.fsutil import atomic_write_text
from proxytune.images import data_uri, image_grid
from proxytune.prompts import fill

THUMB = 160
METRIC_LABELS = (("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("dino", "DINO"))
COLUMN_TITLES = {
    "student": "student",
    "supervisor": "supervisor",
    "gain": "student − supervisor",
    "relative_gain": "relative gain",
}
STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:.5rem 0}
td,th{border:1px solid #ccc;padding:.3rem .7rem;text-align:right}
th:first-child,td:first-child{text-align:left}.best{font-weight:bold;background:#e8f5e9}
.row{display:flex;gap:1rem;align-items:flex-start;flex-wrap:wrap}.cap{font-size:.85rem;color:#555}
img{image-rendering:auto;border:1px solid #ddd}
"""


def write_report(
    path: str | Path,
    runs: Sequence,
    evaluation: Mapping,
    samples: Sequence[Mapping[str, Sequence[Image.Image]]],
    cards: Sequence[Mapping[str, AdapterCard]],
    variance_plot: Path | None = None,
) -> None:
    """The report of one evaluation: per subject (`runs[i]`, `evaluation["subjects"][i]`) its
    reference photos, metrics and per-prompt grids; above them the run's metrics and, with
    `variance_plot` (the PNG `proxytune.variance.plot_variance` wrote), the feature spread."""
    results = evaluation["subjects"]
    names = ", ".join(r["subject"] for r in results)
    student, encoders = evaluation["student"], evaluation["encoders"]
    sampling = ", ".join(f"{k} {v}" for k, v in student["sampling"].items())
    parts = [
        f"<h1>Proxy-Tuning report: {_e(names)}</h1>",
        f"<p>Student <b>{_e(student['backend'])}</b> (sampling: {_e(sampling)}) tuned on proxy images "
        f"from {_e(', '.join(sorted({_supervisor(c['supervisor']) for c in cards})))}.</p>",
        "<h2>Subject fidelity</h2>",
        _metrics_table(evaluation["metrics"]),
        f"<p class=cap>{_e(evaluation['protocol'])}. Encoders: CLIP {_encoder(encoders['clip'])}, "
        f"DINO {_encoder(encoders['dino'])}."
        + (" Means over the subjects below." if len(results) > 1 else "")
        + "</p>",
        f"<img alt='training curves and metrics' src='{_plots(evaluation['metrics'], cards)}'>",
    ]
    if variance_plot:
        parts += _variance_section(evaluation, variance_plot)
    for run, result, images in zip(runs, results, samples, strict=True):
        parts += _subject_section(run, result, images, len(results) > 1)
    body = "\n".join(parts)
    page = f"<!doctype html><html><head><meta charset=utf-8><title>proxytune: {_e(names)}</title>"
    atomic_write_text(path, f"{page}<style>{STYLE}</style></head><body>{body}</body></html>\n")


def _subject_section(
    run, result: Mapping, images: Mapping[str, Sequence[Image.Image]], several: bool
) -> list[str]:
    subject = run.subject
    per_prompt = len(images["student"]) // len(result["per_prompt"]["student"])
    parts = [
        f"<h2>{_e(subject.name)} ({_e(subject.class_noun)}), "
        f"identifier <code>{_e(subject.identifier)}</code></h2>",
        *([_metrics_table(result["metrics"])] if several else []),
        "<h3>Reference photos</h3>",
        _img(image_grid(run.photos, columns=len(run.photos), cell=THUMB)),
        "<h3>Samples</h3>",
    ]
    for p, row in enumerate(result["per_prompt"]["student"]):
        cells = []
        for model in images:
            grid = image_grid(
                images[model][p * per_prompt : (p + 1) * per_prompt], columns=per_prompt, cell=THUMB
            )
            score = result["per_prompt"][model][p]
            cells.append(
                f"<div>{_img(grid)}<div class=cap>{model}: "
                f"CLIP-I {score['clip_i']:.3f} · CLIP-T {score['clip_t']:.3f} · "
                f"DINO {score['dino']:.3f}</div></div>"
            )
        prompt = fill(row["prompt"], subject.identifier, subject.class_noun)
        parts.append(f"<h4>{_e(prompt)}</h4><div class=row>{''.join(cells)}</div>")
    return parts


def _variance_section(evaluation: Mapping, plot: Path) -> list[str]:
    """The supplementary's Fig. 1 for this run: a table of each model's spread per subject and the plot."""
    variance = evaluation["variance"]
    head = "".join(
        f"<th>{c}</th>" for c in ("subject", "model", "total variance", "mean distance", "median distance")
    )
    rows = "".join(
        f"<tr><td>{_e(result['subject'])}</td><td>{_e(model)}</td><td>{s['total_variance']:.4f}</td>"
        f"<td>{s['mean_distance']:.4f}</td><td>{s['median_distance']:.4f}</td></tr>"
        for result in evaluation["subjects"]
        for model, s in result["variance"].items()
    )
    with Image.open(plot) as image:
        uri = data_uri(image)
    return [
        "<h2>Feature spread</h2>",
        f"<table><tr>{head}</tr>{rows}</table>",
        f"<p class=cap>{variance['samples']} more samples per model and subject, prompts cycling through "
        f"the DreamBench list, seeds from {variance['first_seed']}; {_e(variance['features'])} features "
        "(L2-normalised, as for the DINO metric). Total variance: trace of the unbiased covariance; "
        f"distance: L2 to the subject centroid ({_e(variance['centroid'])}). Lower is more concentrated "
        "around the subject (the paper's supplementary, Fig. 1).</p>",
        f"<img alt='feature variance' src='{uri}'>",
    ]


def _encoder(encoder: Mapping[str, str | None]) -> str:
    """`clip-vit-b32 (openai/clip-vit-base-patch32 @ <commit>)`, `(<folder>, local copy)` or `(tiny:clip)`."""
    revision = encoder["revision"]
    where = {None: "", "local": ", local copy"}.get(revision, f" @ {revision}")
    return _e(f"{encoder['backend']} ({encoder['source']}{where})")


def _e(text: object) -> str:
    return html.escape(str(text))


def _img(image: Image.Image) -> str:
    return f"<img alt='' src='{data_uri(image)}'>"


def _supervisor(card: AdapterCard) -> str:
    return f"a black box (images imported from {card.base_model.id})" if card.imported else card.backend


def comparison(metrics: Mapping[str, Mapping[str, float]]) -> list[dict[str, str | float]]:
    """One row per metric: the student, and when a supervisor was sampled (not a black box)
    the supervisor and the student's gain over it, absolute and relative."""
    rows: list[dict[str, str | float]] = []
    for key, label in METRIC_LABELS:
        row: dict[str, str | float] = {"metric": label, "student": metrics["student"][key]}
        if "supervisor" in metrics:
            supervisor = metrics["supervisor"][key]
            gain = metrics["student"][key] - supervisor
            row.update(supervisor=supervisor, gain=gain, relative_gain=gain / abs(supervisor))
        rows.append(row)
    return rows


def _columns(rows: Sequence[Mapping]) -> list[tuple[str, str]]:
    return [(key, title) for key, title in COLUMN_TITLES.items() if key in rows[0]]


def _cell(key: str, value: float) -> str:
    return f"{value:+.2%}" if key == "relative_gain" else f"{value:+.4f}" if key == "gain" else f"{value:.4f}"


def markdown_table(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """The comparison as a Markdown table (the KFP Markdown artifact, and MLflow)."""
    rows = comparison(metrics)
    columns = _columns(rows)
    lines = [
        "| metric | " + " | ".join(title for _, title in columns) + " |",
        "|---|" + "---:|" * len(columns),
        *(f"| {r['metric']} | " + " | ".join(_cell(k, r[k]) for k, _ in columns) + " |" for r in rows),
    ]
    return "\n".join(lines) + "\n"


def _metrics_table(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """The comparison, the better of student and supervisor marked."""
    rows = comparison(metrics)
    columns = _columns(rows)
    body = []
    for row in rows:
        best = {}
        if "supervisor" in row:
            best = {"student": row["student"] >= row["supervisor"]}
            best["supervisor"] = not best["student"]
        cells = "".join(
            f"<td class='{'best' if best.get(k) else ''}'>{_cell(k, row[k])}</td>" for k, _ in columns
        )
        body.append(f"<tr><td>{row['metric']}</td>{cells}</tr>")
    head = "<tr><th>metric</th>" + "".join(f"<th>{_e(t)}</th>" for _, t in columns) + "</tr>"
    return f"<table>{head}{''.join(body)}</table>"


def _plots(metrics: Mapping[str, Mapping[str, float]], cards: Sequence[Mapping[str, AdapterCard]]) -> str:
    """Training-loss curves (every subject's supervisor, the student) and a bar chart of the
    metrics, as a data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.2), dpi=90)
    trained = [c["supervisor"] for c in cards if not c["supervisor"].imported]
    for card in trained:
        axes[0].plot(range(1, len(card.losses) + 1), card.losses, lw=1, label=card.subjects[0].name)
    backends = ", ".join(sorted({c.backend for c in trained})) or "none trained: imported images"
    axes[0].set_title(f"supervisor training loss ({backends})")
    if len(trained) > 1:
        axes[0].legend(fontsize="small")
    student = cards[0]["student"]
    axes[1].plot(range(1, len(student.losses) + 1), student.losses, lw=1, label="train (batch)")
    for split, before in student.loss_before.items():
        axes[1].plot(
            [0, len(student.losses)],
            [before, student.loss_after[split]],
            "o--",
            label=f"{split} before/after",
        )
    axes[1].legend(fontsize="small")
    axes[1].set_title(f"student training loss ({student.backend})")
    for axis in axes[:2]:
        axis.set_xlabel("step")
    keys = ("clip_i", "clip_t", "dino")
    for offset, model in zip((-0.2, 0.2), metrics, strict=False):
        axes[2].bar([i + offset for i in range(3)], [metrics[model][k] for k in keys], width=0.4, label=model)
    axes[2].set_xticks(range(3), ["CLIP-I", "CLIP-T", "DINO"])
    axes[2].legend()
    axes[2].set_title("subject fidelity")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return data_uri(Image.open(io.BytesIO(buffer.getvalue())))
