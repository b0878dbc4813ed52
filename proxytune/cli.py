"""Command line: `proxytune run --local`, `generate`, `convert-vqgan`, `compile`, `upload`,
`backends`, `presets`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(soft_wrap=True)  # paths and commands stay copy-pasteable


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        console.print(f"[red]error:[/red] {error}")
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxytune", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the Proxy-Tuning pipeline")
    run.add_argument(
        "--local", action="store_true", required=True, help="run on this machine through kfp.local"
    )
    run.add_argument(
        "--subject",
        action="append",
        default=[],
        help="folder or s3://bucket/prefix with 3-6 photos (default: examples/subjects/dog); "
        "repeat for a multi-subject student",
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
    run.add_argument("--preset", default="tiny", help="parameter preset: tiny (CPU, default) or paper (GPU)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one parameter, e.g. --set supervisor.steps=100 (repeatable)",
    )
    run.add_argument(
        "--workdir", default="proxytune-work", help="outputs, MLflow DB and store (default: ./proxytune-work)"
    )
    run.add_argument("--experiment", default="proxytune", help="MLflow experiment")
    run.add_argument("--model-name", default="", help="registered model name (default: proxytune-<subject>)")
    run.set_defaults(handler=_run)

    compile_ = commands.add_parser("compile", help="compile the pipeline to KFP YAML")
    compile_.add_argument("-o", "--output", default="proxy-tuning.yaml", help="output file")
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
    _cluster_arguments(upload)
    upload.set_defaults(handler=_upload)

    backends = commands.add_parser("backends", help="list the model backends by kind")
    backends.set_defaults(handler=_backends)

    presets = commands.add_parser("presets", help="print every parameter of every preset")
    presets.add_argument("--all", action="store_true", help="also the parameters no preset changes")
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
    return parser


def _run(args: argparse.Namespace) -> int:
    from proxytune.config import parse_overrides
    from proxytune.local import EXAMPLE_CLASS, EXAMPLE_SUBJECT, run_local

    subjects = _subjects(args, EXAMPLE_SUBJECT, EXAMPLE_CLASS)
    described = ", ".join(f"{s['uri']} ({s['class_noun']})" for s in subjects)
    console.rule(f"proxytune: {described}, preset {args.preset}")
    try:
        summary = run_local(
            subjects,
            args.workdir,
            preset=args.preset,
            overrides=parse_overrides(args.overrides),
            experiment=args.experiment,
            registered_model_name=args.model_name,
        )
    except RuntimeError as error:
        console.print(f"[red]pipeline failed:[/red] {error}")
        console.print(f"summary: {Path(args.workdir).resolve() / 'summary.json'}")
        return 1
    _print_summary(summary)
    return 0


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


def _print_summary(summary: dict) -> None:
    table = Table(title="Subject fidelity (raw cosine, all pairs)")
    table.add_column("model")
    for label in ("CLIP-I", "CLIP-T", "DINO"):
        table.add_column(label, justify="right")
    for model, scores in summary["metrics"].items():
        table.add_row(model, *(f"{scores[k]:.4f}" for k in ("clip_i", "clip_t", "dino")))
    console.print(table)
    model = summary["registered_model"]
    console.print(
        f"registered: [bold]{model['name']}[/bold] v{model['version']} {model['aliases']} ({model['gate']})"
    )
    console.print(f"report:     {summary['report']}")
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
    console.print(f"compiled pipeline -> {compile_pipeline(args.output, cluster)} (image {cluster.image})")
    return 0


def _upload(args: argparse.Namespace) -> int:
    from proxytune.upload import upload

    done = upload(args.host, _cluster(args), args.name, args.version, args.namespace or None)
    if done.new_pipeline:
        console.print(f"uploaded pipeline [bold]{args.name}[/bold] (id {done.pipeline_id}) to {args.host}")
    else:
        console.print(
            f"uploaded version [bold]{done.version_name}[/bold] of {args.name} "
            f"(pipeline {done.pipeline_id}, version {done.version_id}) to {args.host}"
        )
    return 0


def _pair(assignment: str) -> tuple[str, str]:
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {assignment!r}")
    return key, value


def _presets(args: argparse.Namespace) -> int:
    from proxytune.config import PRESETS, RunParams, preset_values

    values = preset_values()
    names = list(values)
    table = Table(title="proxytune presets (override any value with --set section.field=value)")
    table.add_column("parameter")
    for name in names:
        table.add_column(name)
    for key in values[names[0]]:
        row = [values[name][key] for name in names]
        if args.all or any(v != row[0] for v in row):
            table.add_row(key, *(repr(v) if isinstance(v, str) else str(v) for v in row))
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


if __name__ == "__main__":
    sys.exit(main())
