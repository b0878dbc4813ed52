"""The evaluation report: one self-contained HTML page (images inlined), which the Kubeflow
UI renders for the HTML artifact and MLflow shows as a run artifact."""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from proxytune.analysis.metrics import gains
from proxytune.core.contracts import AdapterCard
from proxytune.core.fsutil import atomic_write_text
from proxytune.core.images import data_uri, image_grid
from proxytune.core.prompts import fill

THUMB = 160
METRIC_LABELS = (("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("dino", "DINO"))
METHOD_TITLES = {
    "student": "student (proxy-tuned)",
    "supervisor": "supervisor (diffusion teacher)",
    "direct": "direct (tuned on the photos)",
    "base": "base (untuned)",
}
STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:.5rem 0}
td,th{border:1px solid #ccc;padding:.3rem .7rem;text-align:right}
th:first-child,td:first-child{text-align:left}.best{font-weight:bold;background:#e8f5e9}
.paper td{font-style:italic;color:#666}.verdict{font-size:1.1rem}
.warn{background:#fff3e0;border-left:4px solid #ef6c00;padding:.5rem .8rem}
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
    `variance_plot` (the PNG `proxytune.analysis.variance.plot_variance` wrote), the feature spread."""
    results = evaluation["subjects"]
    names = ", ".join(r["subject"] for r in results)
    student, encoders = evaluation["student"], evaluation["encoders"]
    sampling = ", ".join(f"{k} {v}" for k, v in student["sampling"].items())
    parts = [
        f"<h1>Proxy-Tuning report: {_e(names)}</h1>",
        f"<p>Student <b>{_e(student['backend'])}</b> (sampling: {_e(sampling)}) tuned on proxy images "
        f"from {_e(', '.join(sorted({_supervisor(c['supervisor']) for c in cards})))}.</p>",
        *(
            [f"<p class=warn id=random-weights>{_e(random_note(evaluation))}</p>"]
            if random_note(evaluation)
            else []
        ),
        "<h2>Subject fidelity</h2>",
        f"<p class=verdict id=verdict>{_e(verdict(evaluation['metrics']))}</p>",
        _metrics_table(evaluation["metrics"], evaluation.get("reported", ()), "comparison"),
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


def random_note(evaluation: Mapping) -> str:
    """The tiny preset's warning: with random-weight models the scores test the plumbing only."""
    models = evaluation.get("random_weights")
    if not models:
        return ""
    return (
        f"Random-weight models ({', '.join(models)}): these numbers test the plumbing, not the method; "
        "they mean nothing about subject fidelity. Use the small or paper preset for real scores."
    )


def verdict(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """The run's answer in one sentence: on how many scores the student beat each other method,
    and by how much on DINO (the subject-fidelity score the paper leads with)."""
    parts = []
    for method, scores in _ordered(gains(metrics)):
        won = [label for key, label in METRIC_LABELS if scores[key]["gain"] > 0]
        dino = scores["dino"]
        parts.append(
            f"beat the {method} on {len(won)} of {len(METRIC_LABELS)} scores ({', '.join(won) or 'none'}; "
            f"DINO {dino['gain']:+.4f}, {dino['relative_gain']:+.1%})"
        )
    return f"The student {'; '.join(parts)}." if parts else "Only the student was scored."


def comparison_markdown(evaluation: Mapping) -> str:
    """The evaluation's comparison as Markdown (the KFP Markdown artifact, and MLflow), after
    the random-weights warning when it applies."""
    note = random_note(evaluation)
    return (f"> {note}\n\n" if note else "") + markdown_table(evaluation["metrics"], evaluation["reported"])


def markdown_table(metrics: Mapping[str, Mapping[str, float]], reported: Sequence[Mapping] = ()) -> str:
    """The comparison in the paper's shape: method x (CLIP-I, CLIP-T, DINO), the paper's
    numbers where they apply, then the student's gain over each other method, absolute and
    relative, and the verdict."""
    head = "| {} | " + " | ".join(label for _, label in METRIC_LABELS) + " |"
    rule = "|---|" + "---:|" * len(METRIC_LABELS)
    lines = [head.format("method"), rule]
    lines += [
        f"| {METHOD_TITLES[m]} | {' | '.join(_score(s[k]) for k, _ in METRIC_LABELS)} |"
        for m, s in _ordered(metrics)
    ]
    lines += [
        f"| paper: {r['label']} ({r['source']}) | {' | '.join(_score(r[k]) for k, _ in METRIC_LABELS)} |"
        for r in reported
    ]
    versus = gains(metrics)
    if versus:
        lines += ["", head.format("student vs"), rule]
        lines += [
            f"| {m} | {' | '.join(_gain(g[k]) for k, _ in METRIC_LABELS)} |" for m, g in _ordered(versus)
        ]
    return "\n".join([*lines, "", verdict(metrics)]) + "\n"


def _metrics_table(
    metrics: Mapping[str, Mapping[str, float]], reported: Sequence[Mapping] = (), table_id: str = ""
) -> str:
    """The comparison as HTML: the best method per score marked, the paper's rows in italics,
    then the gains table (ids `table_id` and `table_id-gains` for the run's own tables)."""
    best = {k: max(s[k] for s in metrics.values()) for k, _ in METRIC_LABELS}
    head = "".join(f"<th>{label}</th>" for _, label in METRIC_LABELS)
    rows = [
        f"<tr><td>{_e(METHOD_TITLES[m])}</td>"
        + "".join(
            f"<td class='{'best' if s[k] == best[k] else ''}'>{_score(s[k])}</td>" for k, _ in METRIC_LABELS
        )
        + "</tr>"
        for m, s in _ordered(metrics)
    ]
    rows += [
        f"<tr class=paper><td>paper: {_e(r['label'])} ({_e(r['source'])})</td>"
        + "".join(f"<td>{_score(r[k])}</td>" for k, _ in METRIC_LABELS)
        + "</tr>"
        for r in reported
    ]
    ids = (f" id={table_id}", f" id={table_id}-gains") if table_id else ("", "")
    tables = [f"<table{ids[0]} class=comparison><tr><th>method</th>{head}</tr>{''.join(rows)}</table>"]
    versus = gains(metrics)
    if versus:
        gain_rows = "".join(
            f"<tr><td>{_e(m)}</td>" + "".join(f"<td>{_gain(g[k])}</td>" for k, _ in METRIC_LABELS) + "</tr>"
            for m, g in _ordered(versus)
        )
        tables.append(f"<table{ids[1]} class=gains><tr><th>student vs</th>{head}</tr>{gain_rows}</table>")
    return "\n".join(tables)


def _ordered(by_method: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Methods in the one order every table and plot uses (student first)."""
    return [(m, by_method[m]) for m in METHOD_TITLES if m in by_method]


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _gain(gain: Mapping[str, float]) -> str:
    return f"{gain['gain']:+.4f} ({gain['relative_gain']:+.2%})"


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
    width = 0.8 / len(metrics)
    for n, (method, scores) in enumerate(_ordered(metrics)):
        offset = (n - (len(metrics) - 1) / 2) * width
        values = [scores[k] for k, _ in METRIC_LABELS]
        axes[2].bar([i + offset for i in range(len(values))], values, width=width, label=method)
    axes[2].set_xticks(range(len(METRIC_LABELS)), [label for _, label in METRIC_LABELS])
    axes[2].legend()
    axes[2].set_title("subject fidelity")
    return _figure_uri(figure)


def bench_page(table: Mapping) -> str:
    """The DreamBench-wide report: the verdict on the means, the comparison table with the
    paper's numbers, one row per subject and method, and per-subject bars of every score."""
    rows = table["subjects"]
    head = "".join(f"<th>{label}</th>" for _, label in METRIC_LABELS)
    body = "".join(
        f"<tr><td>{_e(r['subject'])}</td><td>{_e(r['class_noun'])}</td><td>{_e(m)}</td>"
        + "".join(f"<td>{_score(s[k])}</td>" for k, _ in METRIC_LABELS)
        + "</tr>"
        for r in rows
        for m, s in _ordered(r["metrics"])
    )
    counts = ", ".join(f"{m} on {n}" for m, n in _ordered(table["counts"]))
    note = random_note(table)
    parts = [
        f"<h1>DreamBench: {len(rows)} subject(s)</h1>",
        *([f"<p class=warn id=random-weights>{_e(note)}</p>"] if note else []),
        f"<p class=verdict id=verdict>{_e(verdict(table['means']))}</p>",
        _metrics_table(table["means"], table["reported"], "comparison"),
        f"<p class=cap>Means over subjects ({_e(counts)}). {_e(table['protocol'])}. Encoders: CLIP "
        f"{_encoder(table['encoders']['clip'])}, DINO {_encoder(table['encoders']['dino'])}.</p>",
        f"<img alt='scores per subject and method' src='{_subject_bars(rows)}'>",
        "<h2>Per subject</h2>",
        f"<table id=subjects><tr><th>subject</th><th>class</th><th>method</th>{head}</tr>{body}</table>",
    ]
    page = "<!doctype html><html><head><meta charset=utf-8><title>proxytune: DreamBench</title>"
    return f"{page}<style>{STYLE}</style></head><body>{chr(10).join(parts)}</body></html>\n"


def _subject_bars(rows: Sequence[Mapping]) -> str:
    """One panel per score: bars per subject, one per method, as a data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHOD_TITLES if any(m in r["metrics"] for r in rows)]
    figure, axes = plt.subplots(1, len(METRIC_LABELS), figsize=(13, 3.4), dpi=90)
    width = 0.8 / len(methods)
    for axis, (key, label) in zip(axes, METRIC_LABELS, strict=True):
        for n, method in enumerate(methods):
            offset = (n - (len(methods) - 1) / 2) * width
            scored = [(i, r["metrics"][method][key]) for i, r in enumerate(rows) if method in r["metrics"]]
            axis.bar([i + offset for i, _ in scored], [v for _, v in scored], width=width, label=method)
        axis.set_xticks(range(len(rows)), [r["subject"] for r in rows], rotation=45, ha="right")
        axis.set_title(label)
    axes[0].legend(fontsize="small")
    return _figure_uri(figure)


def _figure_uri(figure) -> str:
    """A matplotlib figure as a PNG data URI (closed after)."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return data_uri(Image.open(io.BytesIO(buffer.getvalue())))
