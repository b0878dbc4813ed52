"""`run` (the pipeline on this machine), `bench` (DreamBench-wide) and `gc` (what runs left
behind): the commands that work in a local workdir.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape

from proxytune.cli.console import INTERRUPTED, console, print_scores

if TYPE_CHECKING:
    from proxytune.ops.runconfig import RunConfig


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add `run`, `bench` and `gc`."""
    run = commands.add_parser("run", help="run the Proxy-Tuning pipeline on this machine")
    run.add_argument(
        "--local",
        action="store_true",
        help="run on this machine through kfp.local (the only mode of `run`, so also the default; "
        "`submit` starts runs on Kubeflow)",
    )
    run.add_argument(
        "--config",
        metavar="FILE",
        help="run config YAML (subjects, preset, overrides, registered_model_name, experiment; "
        "see examples/run-config.yaml); the flags below override it",
    )
    run.add_argument(
        "--subject",
        action="append",
        default=[],
        help="folder or s3://bucket/prefix with 3-6 photos (default: the config's, else "
        "examples/subjects/dog); repeat for a multi-subject student; replaces the config's subjects",
    )
    run.add_argument(
        "--class-noun",
        action="append",
        default=[],
        help="the subject's class, e.g. dog, backpack; one per --subject (default with the example: dog)",
    )
    run.add_argument(
        "--name",
        action="append",
        default=[],
        help="subject name, one per --subject (default: the folder name)",
    )
    run.add_argument(
        "--identifier",
        action="append",
        default=[],
        help="rare token bound to the subject, one per --subject (default: sks, then ohwx, zwx, ...)",
    )
    run.add_argument(
        "--proxy-from",
        dest="proxy_uri",
        action="append",
        default=[],
        metavar="DIR|s3://...",
        help="import the subject's proxy images from here (made by any supervisor, with optional "
        "<image stem>.txt captions) instead of tuning one; once per --subject, '' to draw them",
    )
    _run_arguments(run)
    run.add_argument("--experiment", help="MLflow experiment (default: the config's, else proxytune)")
    run.add_argument("--verbose", action="store_true", help="stream every step's whole output")
    run.add_argument(
        "--fresh", action="store_true", help="run every step again (default: reuse finished steps' outputs)"
    )
    run.add_argument(
        "--model-name", help="registered model name (default: the config's, else proxytune-<subject>)"
    )
    run.set_defaults(handler=_run)

    bench = commands.add_parser(
        "bench",
        help="run the protocol over every subject of a DreamBench-layout dataset (the dreambench pipeline)",
    )
    bench.add_argument(
        "--dataset",
        required=True,
        metavar="DIR|s3://...",
        help="one folder of photos per subject and prompts_and_classes.txt (subject_name,class lines)",
    )
    bench.add_argument(
        "--subjects", default="", metavar="A,B", help="only these subjects (default: every one with a folder)"
    )
    _run_arguments(bench)
    bench.add_argument("--experiment", default="proxytune-dreambench", help="MLflow experiment")
    bench.set_defaults(handler=_bench)

    gc = commands.add_parser("gc", help="remove what local runs left behind that nothing will reuse")
    gc.add_argument(
        "--workdir", default="proxytune-work", help="the runs' workdir (default: ./proxytune-work)"
    )
    gc.add_argument(
        "--older-than",
        type=_positive_or_zero,
        default=7.0,
        metavar="DAYS",
        help="remove partial proxy sets untouched this long (default: 7)",
    )
    gc.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    gc.set_defaults(handler=_gc)


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    """What `run --local` and `bench` share: preset, overrides, workdir."""
    parser.add_argument(
        "--preset",
        help="parameter preset: tiny (CPU), small or paper (GPU) (default: the config's, else tiny)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one parameter, e.g. --set supervisor.steps=100 (repeatable; over the config's)",
    )
    parser.add_argument(
        "--workdir", default="proxytune-work", help="outputs, MLflow DB and store (default: ./proxytune-work)"
    )


def _run(args: argparse.Namespace) -> int:
    """Validate everything (inputs, paths, servers) in the first seconds, then run supervised
    (`proxytune.ops.runner`): a step per line, logs on disk, clean interrupts."""
    import os

    from proxytune.ops.local import check_run, local_defaults
    from proxytune.ops.runner import check_servers, run_supervised

    config = _run_config(args)
    workdir = _workdir(args.workdir)
    check_run(config)
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or local_defaults(workdir)["MLFLOW_TRACKING_URI"]
    check_servers(tracking_uri)
    described = ", ".join(f"{s.uri} ({s.class_noun})" for s in config.subjects)
    console.rule(f"proxytune: {described}, preset {config.preset}")
    request = {
        "subjects": config.subject_fields(),
        "workdir": str(workdir),
        "preset": config.preset,
        "overrides": dict(config.overrides),
        "experiment": config.experiment,
        "registered_model_name": config.registered_model_name,
        "fresh": args.fresh,
        "checked": True,  # just now, above
    }
    outcome, summary = run_supervised(request, workdir, tracking_uri, console, args.verbose)
    summary_path = workdir / "summary.json"
    if outcome == "interrupted":
        step = f" during {summary['interrupted_step']}" if summary["interrupted_step"] else ""
        done = len(summary["finished_steps"])
        console.print(
            f"[yellow]interrupted{step}[/yellow]: the same command reuses the {done} finished "
            "step(s) and the proxy images drawn so far"
        )
        console.print(f"summary: {summary_path}")
        return INTERRUPTED
    if outcome == "failed":
        console.print(
            f"[red]✗ {summary['failed_step'] or 'the pipeline'} failed:[/red] {escape(summary['cause'])}"
        )
        console.print(f"log:     {summary['log']}")
        console.print(f"summary: {summary_path}")
        return 1
    _print_summary(summary)
    return 0


def _workdir(value: str) -> Path:
    """The workdir, resolved; refused now if it cannot be a folder we write (nothing is made yet)."""
    import os

    workdir = Path(value).expanduser().resolve()
    existing = next(p for p in (workdir, *workdir.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--workdir {value}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--workdir {value}: {existing} is not writable")
    return workdir


def _run_config(args: argparse.Namespace) -> RunConfig:
    """The run config file (if any) with the flags over it, else the flags alone."""
    from proxytune.core.config import parse_overrides
    from proxytune.ops.local import EXAMPLE_CLASS, EXAMPLE_SUBJECT
    from proxytune.ops.runconfig import load_run_config, validate_run_config

    flags = {
        "preset": args.preset,
        "overrides": parse_overrides(args.overrides),
        "registered_model_name": args.model_name,
        "experiment": args.experiment,
    }
    if not args.config:
        subjects = _subjects(args, EXAMPLE_SUBJECT, EXAMPLE_CLASS)
        return validate_run_config(
            {"subjects": subjects, **{k: v for k, v in flags.items() if v is not None}}
        )
    per_subject = {
        "--class-noun": args.class_noun,
        "--name": args.name,
        "--identifier": args.identifier,
        "--proxy-from": args.proxy_uri,
    }
    given = [flag for flag, values in per_subject.items() if values]
    if given and not args.subject:
        raise ValueError(f"{', '.join(given)} describe --subject: with --config, give the subjects in full")
    subjects = _subjects(args, EXAMPLE_SUBJECT, EXAMPLE_CLASS) if args.subject else None
    return load_run_config(args.config).with_flags(subjects=subjects, **flags)


def _subjects(args: argparse.Namespace, example: Path, example_class: str) -> list[dict[str, str]]:
    """One dict per --subject, pairing the repeated flags in order; without --subject, the
    checkout's example subject (an installed proxytune, as in the image, ships none)."""
    if not args.subject and not example.is_dir():
        raise ValueError(
            f"no --subject given, and the example subject {example} is not here (it comes with a "
            "checkout of proxytune, not with an installed package): pass --subject FOLDER "
            "--class-noun NOUN, or --config FILE"
        )
    uris = args.subject or [str(example)]
    nouns = args.class_noun or ([example_class] if not args.subject else [])
    if len(nouns) != len(uris):
        raise ValueError(
            f"--class-noun is required with --subject, once per subject (e.g. --class-noun dog); "
            f"got {len(uris)} subject(s) and {len(nouns)} class noun(s)"
        )
    subjects = [{"uri": uri, "class_noun": noun} for uri, noun in zip(uris, nouns, strict=True)]
    for flag, key, values in (
        ("name", "name", args.name),
        ("identifier", "identifier", args.identifier),
        ("proxy-from", "proxy_uri", args.proxy_uri),
    ):
        if values and len(values) != len(uris):
            raise ValueError(f"give --{flag} once per --subject or not at all")
        for subject, value in zip(subjects, values, strict=False):
            subject[key] = value
    return subjects


def _print_summary(summary: dict) -> None:
    print_scores(summary["metrics"], "Subject fidelity (raw cosine, all pairs)")
    if summary.get("note"):
        console.print(f"[yellow]note:[/yellow] {summary['note']}")
    model = summary["registered_model"]
    console.print(
        f"registered: [bold]{model['name']}[/bold] v{model['version']} {model['aliases']} ({model['gate']})"
    )
    console.print(f"report:     {summary['report']}")
    console.print(f"student:    {summary['student_adapter']}")
    console.print(f"summary:    {Path(summary['workdir']) / 'summary.json'}  ({summary['seconds']} s)")
    uri = summary["mlflow"]["tracking_uri"]
    if uri.startswith("sqlite:"):
        console.print(f"MLflow UI:  mlflow ui --backend-store-uri {uri}")
    else:
        console.print(f"MLflow:     {uri} (run {summary['mlflow']['parent_run_id']})")


def _bench(args: argparse.Namespace) -> int:
    from proxytune.analysis.bench import REPORT_FILE, TABLE_FILE
    from proxytune.core.config import parse_overrides
    from proxytune.ops.local import run_bench

    subjects = [name.strip() for name in args.subjects.split(",") if name.strip()]
    console.rule(f"proxytune bench: {args.dataset}, preset {args.preset or 'tiny'}")
    try:
        table = run_bench(
            args.dataset,
            args.workdir,
            args.preset or "tiny",
            parse_overrides(args.overrides),
            subjects,
            args.experiment,
        )
    except RuntimeError as error:
        console.print(f"[red]bench failed:[/red] {error}")
        return 1
    print_scores(table["means"], f"Means over {len(table['subjects'])} subject(s) (raw cosine, all pairs)")
    workdir = Path(args.workdir).resolve()
    console.print(f"table:  {workdir / TABLE_FILE}")
    console.print(f"report: {workdir / REPORT_FILE}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    from proxytune.ops.cleanup import DAY_S, collect_garbage
    from proxytune.ops.local import workdir_store

    workdir = Path(args.workdir).expanduser().resolve()
    if not workdir.is_dir():
        raise ValueError(f"--workdir {args.workdir}: no such folder")
    found = collect_garbage(workdir, workdir_store(workdir), args.older_than * DAY_S, args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for removal in found:
        console.print(f"{verb} {removal.what}: {removal.where}", highlight=False)
    console.print(f"{verb} {len(found)} item(s)" if found else "nothing to remove")
    return 0


def _positive_or_zero(value: str) -> float:
    number = float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return number
