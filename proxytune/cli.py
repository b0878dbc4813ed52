"""Command line: `proxytune run --local`, `bench`, `gc`, `generate`, `convert-vqgan`, `compile`,
`upload`, `submit`, `schedule`, `models`, `promote`, `rollback`, `backends`, `presets`, `study`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from proxytune.runconfig import RunConfig

console = Console(soft_wrap=True)  # paths and commands stay copy-pasteable
NOT_PROMOTED = 3  # `submit --wait`: the run registered a version that did not become champion
SUBMIT_EXIT_CODES = """exit codes:
  0  started (without --wait), or the run's registered version is champion
  1  the run failed, was cancelled or skipped, is still running after --timeout (it goes on),
     or no registered version carries its run id (or MLflow could not be read)
  2  bad arguments or run config, or Kubeflow Pipelines refused or could not be reached
  3  the run registered a version that was not promoted (challenger only; the gate tag says why)"""


EXIT_CODES = """exit codes:
  0    done
  1    a run failed (the step and its cause are printed and in summary.json)
  2    bad input or arguments, an unreachable server or an unwritable path: refused, nothing ran
  3    submit --wait: the run's version was registered but not promoted
  130  interrupted (Ctrl-C)
--debug shows the Python traceback of any of these."""
INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    """The CLI. An expected failure prints one line and exits with its code (EXIT_CODES);
    only a bug shows a traceback, unless --debug."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        console.print("[yellow]interrupted[/yellow]")
        return INTERRUPTED
    except (ValueError, OSError) as error:  # OSError: missing or unwritable paths, unreachable servers
        if args.debug:
            raise
        console.print(f"[red]error:[/red] {escape(' '.join(str(error).strip().splitlines()))}")
        return 2


def _parser() -> argparse.ArgumentParser:
    from proxytune import __version__

    parser = argparse.ArgumentParser(
        prog="proxytune",
        description=__doc__,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"proxytune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of failures")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

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

    compile_ = commands.add_parser("compile", help="compile a pipeline to KFP YAML")
    compile_.add_argument("-o", "--output", default="proxy-tuning.yaml", help="output file")
    _pipeline_argument(compile_)
    _cluster_arguments(compile_)
    compile_.set_defaults(handler=_compile)

    upload = commands.add_parser(
        "upload", help="compile and upload the pipeline to Kubeflow Pipelines (a new version if it exists)"
    )
    upload.add_argument(
        "--host", required=True, help="Kubeflow Pipelines API, e.g. http://ml-pipeline-ui.kubeflow"
    )
    upload.add_argument("--name", default="proxy-tuning", help="name in the UI (default: %(default)s)")
    upload.add_argument("--version", help="name of a new version (default: <image tag>-<UTC time>)")
    upload.add_argument("--namespace", help="namespace of a multi-user Kubeflow (token: $KF_PIPELINES_TOKEN)")
    _pipeline_argument(upload)
    _cluster_arguments(upload)
    upload.set_defaults(handler=_upload)

    submit = commands.add_parser(
        "submit",
        help="compile and start a run of a run config on Kubeflow Pipelines; --wait for its outcome",
        description="Compile the pipeline (as `compile` does) and start a run with the run config's\n"
        "arguments. With --wait, poll the run, then read the model version it registered from\n"
        "MLflow (tag proxytune.kfp_run_id = the run id) and print its aliases, gate and metrics.",
        epilog=SUBMIT_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _remote_arguments(submit)
    submit.add_argument("--wait", action="store_true", help="wait for the run, then report its model version")
    submit.add_argument(
        "--timeout",
        type=_positive,
        default=86400.0,
        metavar="S",
        help="with --wait: give up waiting after S seconds (default: a day); the run goes on",
    )
    submit.add_argument(
        "--poll-interval", type=_positive, default=5.0, metavar="S", help="seconds between polls (default: 5)"
    )
    submit.add_argument(
        "--mlflow-tracking-uri",
        metavar="URI",
        help="with --wait: the MLflow server that holds the registry, as reached from here "
        "(default: $MLFLOW_TRACKING_URI)",
    )
    _cluster_arguments(submit)
    submit.set_defaults(handler=_submit)

    schedule = commands.add_parser(
        "schedule",
        help="create or replace a recurring run of a run config on Kubeflow Pipelines",
        description="Create a recurring run of the compiled pipeline with the run config's arguments "
        "(at most one run at a time, no catch-up after a pause). KFP cannot update a recurring run: "
        "when one of that name exists, the new one is created first, then the old one is deleted.",
    )
    _remote_arguments(schedule)
    schedule.add_argument(
        "--cron",
        required=True,
        metavar="EXPR",
        help="when, in UTC: standard 5-field cron ('0 3 * * 1': Mondays at 03:00) or KFP's 6 fields "
        "with seconds first ('0 0 3 * * 1')",
    )
    schedule.add_argument("--name", help="recurring run name (default: the registered model name)")
    _cluster_arguments(schedule)
    schedule.set_defaults(handler=_schedule)

    models = commands.add_parser(
        "models", help="registered students: versions, aliases, metrics, gate decisions"
    )
    models.add_argument("name", nargs="?", help="a registered model (default: list them all)")
    models.set_defaults(handler=_models)

    promote = commands.add_parser("promote", help="make a version champion, through the gate unless --force")
    promote.add_argument("name", help="registered model, e.g. proxytune-dog")
    promote.add_argument("version", help="the version to promote")
    promote.add_argument("--force", action="store_true", help="skip the gate (recorded in the audit tag)")
    promote.set_defaults(handler=_promote)

    rollback = commands.add_parser("rollback", help="champion back to previous-champion")
    rollback.add_argument("name", help="registered model, e.g. proxytune-dog")
    rollback.set_defaults(handler=_rollback)

    backends = commands.add_parser("backends", help="list the model backends by kind")
    backends.set_defaults(handler=_backends)

    presets = commands.add_parser(
        "presets", help="print every parameter: each preset's value and the allowed range"
    )
    presets.add_argument("--changed", action="store_true", help="only the parameters some preset changes")
    presets.set_defaults(handler=_presets)

    generate = commands.add_parser("generate", help="sample images from a tuned student")
    generate.add_argument(
        "--student",
        required=True,
        metavar="DIR|models:/NAME@ALIAS",
        help="adapter folder or registered model",
    )
    generate.add_argument("--prompt", required=True, help='e.g. "a sks dog in the snow"')
    generate.add_argument("-n", dest="count", type=int, default=4, help="number of images (default: 4)")
    generate.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i (default: 0)")
    generate.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    generate.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    for flag, kind in (("guidance-scale", float), ("temperature", float), ("top-k", int), ("top-p", float)):
        generate.add_argument(f"--{flag}", type=kind, help="default: the backend's reference value")
    generate.set_defaults(handler=_generate)

    convert = commands.add_parser(
        "convert-vqgan",
        help="convert Meta's Chameleon VQGAN (Lumina-mGPT's image tokenizer) for student.vq_source",
    )
    convert.add_argument(
        "--checkpoint", required=True, help="tokenizer/vqgan.ckpt of Meta's Chameleon release"
    )
    convert.add_argument("--config", required=True, help="tokenizer/vqgan.yaml beside it")
    convert.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    convert.set_defaults(handler=_convert_vqgan)

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
    return parser


def _gc(args: argparse.Namespace) -> int:
    from proxytune.cleanup import DAY_S, collect_garbage
    from proxytune.local import workdir_store

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


def _pipeline_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pipeline",
        choices=("proxy-tuning", "dreambench"),
        default="proxy-tuning",
        help="proxy-tuning (one run, registers the student) or dreambench (every subject of a dataset)",
    )


def _bench(args: argparse.Namespace) -> int:
    from proxytune.bench import REPORT_FILE, TABLE_FILE
    from proxytune.config import parse_overrides
    from proxytune.local import run_bench

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
    _print_scores(table["means"], f"Means over {len(table['subjects'])} subject(s) (raw cosine, all pairs)")
    workdir = Path(args.workdir).resolve()
    console.print(f"table:  {workdir / TABLE_FILE}")
    console.print(f"report: {workdir / REPORT_FILE}")
    return 0


def _run(args: argparse.Namespace) -> int:
    """Validate everything (inputs, paths, servers) in the first seconds, then run supervised
    (`proxytune.runner`): a step per line, logs on disk, clean interrupts."""
    import os

    from proxytune.local import check_run, local_defaults
    from proxytune.runner import check_servers, run_supervised

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
    from proxytune.config import parse_overrides
    from proxytune.local import EXAMPLE_CLASS, EXAMPLE_SUBJECT
    from proxytune.runconfig import load_run_config, validate_run_config

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
    """One dict per --subject, pairing the repeated flags in order."""
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


def _print_scores(metrics: dict, title: str) -> None:
    table = Table(title=title)
    table.add_column("method")
    for label in ("CLIP-I", "CLIP-T", "DINO"):
        table.add_column(label, justify="right")
    for method, scores in metrics.items():
        table.add_row(method, *(f"{scores[k]:.4f}" for k in ("clip_i", "clip_t", "dino")))
    console.print(table)


def _print_summary(summary: dict) -> None:
    _print_scores(summary["metrics"], "Subject fidelity (raw cosine, all pairs)")
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


def _generate(args: argparse.Namespace) -> int:
    import tempfile

    from proxytune.generate import check_request, generate_images, resolve_student

    sampling = {
        "guidance_scale": args.guidance_scale,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
    }
    check_request(args.prompt, args.count, args.out, **sampling)
    with tempfile.TemporaryDirectory(prefix="proxytune-model-") as cache:
        adapter = resolve_student(args.student, cache)
        record = generate_images(
            adapter, args.prompt, args.out, args.count, args.seed, args.batch_size, **sampling
        )
    out = Path(args.out).resolve()
    console.print(
        f"{len(record['files'])} image(s) of [bold]{record['prompt']}[/bold] by {record['backend']}"
    )
    console.print(f"grid:   {out / 'grid.png'}")
    console.print(f"record: {out / 'generation.json'}")
    return 0


def _convert_vqgan(args: argparse.Namespace) -> int:
    from proxytune.backends._vqgan import convert_checkpoint

    out = convert_checkpoint(args.checkpoint, args.config, args.out).resolve()
    console.print(f"Chameleon VQGAN -> {out}")
    console.print(f"use it with: --set student.vq_source={out}")
    return 0


def _cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """How the compiled pipeline's pods are scheduled (`pipelines.cluster.ClusterOptions`)."""
    parser.add_argument(
        "--image", help="component image, e.g. registry.example/proxytune:abc1234 (default: $PROXYTUNE_IMAGE)"
    )
    parser.add_argument(
        "--resource",
        action="append",
        default=[],
        metavar="STEP.FIELD=VALUE",
        help="a step's cpu, memory, cpu_limit, memory_limit or gpus, e.g. tune-student.memory=128Gi",
    )
    parser.add_argument(
        "--gpu-node-selector",
        action="append",
        metavar="KEY=VALUE",
        help="node label of the GPU pool (repeatable; default nvidia.com/gpu.present=true; 'none': none)",
    )
    parser.add_argument(
        "--gpu-toleration",
        action="append",
        metavar="KEY",
        help="taint key the GPU steps tolerate (repeatable; default nvidia.com/gpu; 'none' for none)",
    )
    parser.add_argument("--model-cache-pvc", help="PVC mounted at /cache (default proxytune-model-cache)")
    parser.add_argument(
        "--hub-online", action="store_true", help="steps may download from the Hugging Face hub (default: no)"
    )


def _cluster(args: argparse.Namespace):
    from pipelines.cluster import ClusterOptions

    chosen: dict = {"hub_online": args.hub_online}
    if args.image:
        chosen["image"] = args.image
    if args.model_cache_pvc:
        chosen["model_cache_pvc"] = args.model_cache_pvc
    if args.gpu_node_selector:
        chosen["gpu_node_selector"] = dict(_pair(s) for s in args.gpu_node_selector if s != "none")
    if args.gpu_toleration:
        chosen["gpu_tolerations"] = [t for t in args.gpu_toleration if t != "none"]
    return ClusterOptions(**chosen).with_overrides(args.resource)


def _compile(args: argparse.Namespace) -> int:
    from pipelines.proxy_tuning import compile_pipeline

    cluster = _cluster(args)
    path = compile_pipeline(args.output, cluster, args.pipeline)
    console.print(f"compiled pipeline {args.pipeline} -> {path} (image {cluster.image})")
    return 0


def _upload(args: argparse.Namespace) -> int:
    from proxytune.upload import upload

    done = upload(args.host, _cluster(args), args.name, args.version, args.namespace or None, args.pipeline)
    if done.new_pipeline:
        console.print(f"uploaded pipeline [bold]{args.name}[/bold] (id {done.pipeline_id}) to {args.host}")
    else:
        console.print(
            f"uploaded version [bold]{done.version_name}[/bold] of {args.name} "
            f"(pipeline {done.pipeline_id}, version {done.version_id}) to {args.host}"
        )
    return 0


def _remote_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", required=True, help="Kubeflow Pipelines API, e.g. http://ml-pipeline-ui.kubeflow"
    )
    parser.add_argument(
        "--config", required=True, metavar="FILE", help="run config YAML (see examples/run-config.yaml)"
    )
    parser.add_argument("--namespace", help="namespace of a multi-user Kubeflow (token: $KF_PIPELINES_TOKEN)")


def _submit(args: argparse.Namespace) -> int:
    import os

    from proxytune.runconfig import load_run_config
    from proxytune.submit import registered_version, submit, wait_for_run

    config = load_run_config(args.config)
    tracking_uri = args.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if args.wait and not tracking_uri:
        raise ValueError(
            "--wait reads the outcome from MLflow: give --mlflow-tracking-uri or set MLFLOW_TRACKING_URI"
        )
    started = submit(args.host, _cluster(args), config, args.namespace or None)
    console.print(
        f"started run [bold]{started.run_name}[/bold] (id {started.run_id}) in experiment {config.experiment}"
    )
    console.print(f"run: {started.url}")
    if not args.wait:
        return 0
    try:
        state = wait_for_run(args.host, started.run_id, args.timeout, args.poll_interval)
        if state is None:
            console.print(f"[red]still running after {args.timeout:g} s[/red]; it goes on: {started.url}")
            return 1
        if state != "SUCCEEDED":
            console.print(f"[red]run {state.lower()}[/red]: {started.url}")
            return 1
        version = registered_version(tracking_uri, started.run_id)
    except RuntimeError as error:
        console.print(f"[red]error:[/red] {error}")
        return 1
    if version is None:
        console.print(
            f"[red]the run succeeded but no model version in {tracking_uri} carries "
            f"proxytune.kfp_run_id = {started.run_id}[/red]"
        )
        return 1
    aliases = ", ".join(version.aliases) or "none"
    console.print(f"registered: [bold]{version.name}[/bold] v{version.version}, aliases: {aliases}")
    console.print(f"gate:       {escape(version.gate) or '(no gate tag)'}")
    table = Table(title="Subject fidelity of the registered version")
    for column in ("metric", "value"):
        table.add_column(column)
    for metric, value in version.metrics.items():
        table.add_row(metric, f"{value:.4f}")
    console.print(table)
    if version.champion:
        return 0
    console.print(f"[yellow]not promoted[/yellow]: version {version.version} is not champion")
    return NOT_PROMOTED


def _schedule(args: argparse.Namespace) -> int:
    from proxytune.runconfig import load_run_config
    from proxytune.submit import schedule

    done = schedule(
        args.host, _cluster(args), load_run_config(args.config), args.cron, args.name, args.namespace or None
    )
    verb = "replaced" if done.replaced else "created"
    console.print(
        f"{verb} recurring run [bold]{done.name}[/bold] (id {done.recurring_run_id}), "
        f"cron '{done.cron}' (KFP's fields: second minute hour day-of-month month day-of-week)"
    )
    if done.replaced:
        console.print(f"deleted the previous one(s) of that name: {', '.join(done.replaced)}")
    console.print(f"recurring run: {done.url}")
    return 0


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {value}")
    return number


def _pair(assignment: str) -> tuple[str, str]:
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {assignment!r}")
    return key, value


def _registry_client():
    import os

    from mlflow import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError("set MLFLOW_TRACKING_URI to the MLflow server (or sqlite:///.../mlflow.db)")
    return MlflowClient(uri)


@contextlib.contextmanager
def _registry_errors():
    """MLflow's errors (an unknown model or version) as the CLI's clear error, exit code 2."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as error:
        raise ValueError(error.message) from None


def _models(args: argparse.Namespace) -> int:
    client = _registry_client()
    with _registry_errors():
        return _list_models(client, args.name)


def _list_models(client, name: str | None) -> int:
    from proxytune.registration import CHAMPION, describe_versions

    if not name:
        table = Table(title="registered students")
        for column in ("name", "versions", "champion", "aliases"):
            table.add_column(column)
        for model in client.search_registered_models(order_by=["name"]):
            aliases = ", ".join(f"{a}={v}" for a, v in sorted(model.aliases.items()))
            versions = len(client.search_model_versions(f"name = '{model.name}'"))
            table.add_row(model.name, str(versions), str(model.aliases.get(CHAMPION, "-")), aliases)
        console.print(table)
        return 0
    table = Table(title=f"{name}: versions")
    columns = ("version", "aliases", "clip_i", "clip_t", "dino", "gate", "audits")
    for column in columns:
        table.add_column(column, justify="right" if column in ("clip_i", "clip_t", "dino") else "left")
    for row in describe_versions(client, name):
        table.add_row(*(escape(row[c]) for c in columns))
    console.print(table)
    return 0


def _promote(args: argparse.Namespace) -> int:
    from proxytune.registration import promote

    with _registry_errors():
        decision = promote(_registry_client(), args.name, args.version, force=args.force)
    if not decision.promoted:
        console.print(f"[yellow]not promoted:[/yellow] {args.name} v{args.version}: {decision.reason}")
        return NOT_PROMOTED
    console.print(f"{args.name} v{args.version} is champion ({decision.reason})")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from proxytune.registration import rollback

    with _registry_errors():
        before, after = rollback(_registry_client(), args.name)
    console.print(f"{args.name}: champion v{before} -> v{after} (rolled back)")
    return 0


def _presets(args: argparse.Namespace) -> int:
    from proxytune.config import PRESETS, RunParams, parameter_bounds, preset_values

    values, bounds = preset_values(), parameter_bounds()
    names = list(values)
    table = Table(title="proxytune parameters (set any with --set section.field=value)")
    table.add_column("parameter")
    for name in names:
        table.add_column(name)
    table.add_column("allowed")
    for key in values[names[0]]:
        row = [values[name][key] for name in names]
        if not args.changed or any(v != row[0] for v in row):
            table.add_row(key, *(repr(v) if isinstance(v, str) else str(v) for v in row), bounds.get(key, ""))
    console.print(table)
    for name in PRESETS:
        try:
            RunParams.resolve(name)
        except ValueError as error:
            console.print(f"[yellow]{name}[/yellow] needs more before it runs: {error}")
    return 0


def _backends(args: argparse.Namespace) -> int:
    from proxytune.registry import REGISTRIES

    table = Table(title="proxytune backends")
    for column in ("kind", "name", "description"):
        table.add_column(column)
    for kind, registry in REGISTRIES.items():
        for name, description in registry.describe().items():
            table.add_row(kind, name, description)
    console.print(table)
    return 0


def _study_export(args: argparse.Namespace) -> int:
    from proxytune.study import export_study

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
    from proxytune.study import CRITERIA, analyze_answers, write_rows_csv

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


if __name__ == "__main__":
    sys.exit(main())
