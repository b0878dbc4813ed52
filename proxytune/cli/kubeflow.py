"""`compile`, `upload`, `submit` and `schedule`: the pipeline on Kubeflow Pipelines, its pods
scheduled as the cluster options say (`pipelines.cluster.ClusterOptions`).
"""

from __future__ import annotations

import argparse

from rich.markup import escape
from rich.table import Table

from proxytune.cli.console import NOT_PROMOTED, console

# The ServiceAccount the kubeflow overlay of manifests/ creates for proxytune's runs.
RUNNER_ACCOUNT = "proxytune-runner"

SUBMIT_EXIT_CODES = """exit codes:
  0  started (without --wait), or the run's registered version is champion
  1  the run failed, was cancelled or skipped, is still running after --timeout (it goes on),
     or no registered version carries its run id (or MLflow could not be read)
  2  bad arguments or run config, or Kubeflow Pipelines refused or could not be reached
  3  the run registered a version that was not promoted (challenger only; the gate tag says why)"""


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add `compile`, `upload`, `submit` and `schedule`."""
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


def _pipeline_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pipeline",
        choices=("proxy-tuning", "dreambench"),
        default="proxy-tuning",
        help="proxy-tuning (one run, registers the student) or dreambench (every subject of a dataset)",
    )


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
    parser.add_argument(
        "--profile",
        choices=["paper", "small"],
        help="CPU, memory and /dev/shm of every step sized for a preset (default paper; "
        "small: one 24 GB GPU in an 8-core, 32 GB node); --resource changes single steps",
    )
    parser.add_argument("--model-cache-pvc", help="PVC mounted at /cache (default proxytune-model-cache)")
    parser.add_argument(
        "--model-cache-access",
        choices=["ReadWriteOnce", "ReadWriteMany"],
        help="access mode of that PVC (default ReadWriteOnce: GPU steps one at a time; "
        "ReadWriteMany: all at once)",
    )
    parser.add_argument(
        "--hub-online", action="store_true", help="steps may download from the Hugging Face hub (default: no)"
    )


def _remote_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", required=True, help="Kubeflow Pipelines API, e.g. http://ml-pipeline-ui.kubeflow"
    )
    parser.add_argument(
        "--config", required=True, metavar="FILE", help="run config YAML (see examples/run-config.yaml)"
    )
    parser.add_argument("--namespace", help="namespace of a multi-user Kubeflow (token: $KF_PIPELINES_TOKEN)")
    parser.add_argument(
        "--service-account",
        default=RUNNER_ACCOUNT,
        help="ServiceAccount of the run's pods (default: %(default)s, from manifests/; '' = KFP's default)",
    )


def _cluster(args: argparse.Namespace):
    from pipelines.cluster import ClusterOptions

    chosen: dict = {"hub_online": args.hub_online}
    if args.image:
        chosen["image"] = args.image
    if args.profile:
        chosen["profile"] = args.profile
    if args.model_cache_pvc:
        chosen["model_cache_pvc"] = args.model_cache_pvc
    if args.model_cache_access:
        chosen["model_cache_access"] = args.model_cache_access
    if args.gpu_node_selector:
        chosen["gpu_node_selector"] = dict(_pair(s) for s in args.gpu_node_selector if s != "none")
    if args.gpu_toleration:
        chosen["gpu_tolerations"] = [t for t in args.gpu_toleration if t != "none"]
    return ClusterOptions(**chosen).with_overrides(args.resource)


def _pair(assignment: str) -> tuple[str, str]:
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {assignment!r}")
    return key, value


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {value}")
    return number


def _compile(args: argparse.Namespace) -> int:
    from pipelines.proxy_tuning import compile_pipeline

    cluster = _cluster(args)
    path = compile_pipeline(args.output, cluster, args.pipeline)
    console.print(f"compiled pipeline {args.pipeline} -> {path} (image {cluster.image})")
    return 0


def _upload(args: argparse.Namespace) -> int:
    from proxytune.ops.upload import upload

    done = upload(args.host, _cluster(args), args.name, args.version, args.namespace or None, args.pipeline)
    if done.new_pipeline:
        console.print(f"uploaded pipeline [bold]{args.name}[/bold] (id {done.pipeline_id}) to {args.host}")
    else:
        console.print(
            f"uploaded version [bold]{done.version_name}[/bold] of {args.name} "
            f"(pipeline {done.pipeline_id}, version {done.version_id}) to {args.host}"
        )
    return 0


def _submit(args: argparse.Namespace) -> int:
    import os

    from proxytune.ops.runconfig import load_run_config
    from proxytune.ops.submit import registered_version, submit, wait_for_run

    config = load_run_config(args.config)
    tracking_uri = args.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if args.wait and not tracking_uri:
        raise ValueError(
            "--wait reads the outcome from MLflow: give --mlflow-tracking-uri or set MLFLOW_TRACKING_URI"
        )
    started = submit(args.host, _cluster(args), config, args.namespace or None, args.service_account or None)
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
    from proxytune.ops.runconfig import load_run_config
    from proxytune.ops.submit import schedule

    done = schedule(
        args.host,
        _cluster(args),
        load_run_config(args.config),
        args.cron,
        args.name,
        args.namespace or None,
        args.service_account or None,
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
