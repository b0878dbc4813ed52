"""`study export` and `study analyze`: the blind user study's questionnaire from evaluation
folders, and the per-method ratings from its answer files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from proxytune.cli.console import console


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add `study export` and `study analyze`."""
    study = commands.add_parser("study", help="blind user study: questionnaire from evaluations, analysis")
    study_commands = study.add_subparsers(required=True, metavar="SUBCOMMAND")
    export = study_commands.add_parser(
        "export", help="write questionnaire/ (to publish) and key.json (to keep) from evaluation folders"
    )
    export.add_argument("runs", nargs="+", metavar="RUN", help="evaluation output folder (evaluation.json)")
    export.add_argument("--out", required=True, help="study folder (its questionnaire/ must be new or empty)")
    export.add_argument("--prompts", type=int, default=3, help="prompts per subject (default: 3)")
    export.add_argument("--images", type=int, default=2, help="images per prompt and method (default: 2)")
    export.add_argument(
        "--methods", help="comma-separated, e.g. student,supervisor (default: those every subject has)"
    )
    export.add_argument("--seed", type=int, default=0, help="salts study, item, image ids (default: 0)")
    export.set_defaults(handler=_study_export)
    analyze = study_commands.add_parser("analyze", help="per-method mean ratings from answer files")
    analyze.add_argument("answers", nargs="+", metavar="ANSWERS", help="a participant's answers file")
    analyze.add_argument("--key", required=True, help="the study's key.json")
    analyze.add_argument("--csv", metavar="PATH", help="also write the table as CSV")
    analyze.set_defaults(handler=_study_analyze)


def _study_export(args: argparse.Namespace) -> int:
    from proxytune.analysis.study import export_study

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    info = export_study(
        [Path(run) for run in args.runs],
        Path(args.out),
        prompts_per_subject=args.prompts,
        images_per_method=args.images,
        methods=methods,
        seed=args.seed,
    )
    for method, subjects in info.skipped.items():
        console.print(f"[yellow]left out[/yellow] {method}: no samples for {', '.join(subjects)}")
    console.print(
        f"study {info.study}: {info.items} images ({', '.join(info.methods)}; {', '.join(info.subjects)})"
    )
    console.print(f"publish {info.page.parent} (open {info.page}); keep {info.key} private")
    return 0


def _study_analyze(args: argparse.Namespace) -> int:
    from proxytune.analysis.study import CRITERIA, analyze_answers, write_rows_csv

    rows = analyze_answers([Path(a) for a in args.answers], Path(args.key))
    table = Table(title=f"user study: mean rating ± standard error, {len(args.answers)} participant(s)")
    table.add_column("method")
    for _, title, _ in CRITERIA:
        table.add_column(title, justify="right")
    table.add_column("n", justify="right")
    for method in dict.fromkeys(row.method for row in rows):
        cells = {row.criterion: row for row in rows if row.method == method}
        table.add_row(
            method,
            *(f"{cells[key].mean:.2f} ± {cells[key].sem:.2f}" for key, _, _ in CRITERIA),
            str(max(row.n for row in cells.values())),
        )
    console.print(table)
    if args.csv:
        write_rows_csv(rows, Path(args.csv))
        console.print(f"wrote {args.csv}")
    return 0
