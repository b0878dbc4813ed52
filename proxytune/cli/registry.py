"""`models`, `promote` and `rollback`: registered students in the MLflow model registry
(`MLFLOW_TRACKING_URI`), their versions, gate decisions and aliases.
"""

from __future__ import annotations

import argparse
import contextlib

from rich.markup import escape
from rich.table import Table

from proxytune.cli.console import NOT_PROMOTED, console


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add `models`, `promote` and `rollback`."""
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
    from proxytune.stages.registration import CHAMPION, describe_versions

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
    from proxytune.stages.registration import promote

    with _registry_errors():
        decision = promote(_registry_client(), args.name, args.version, force=args.force)
    if not decision.promoted:
        console.print(f"[yellow]not promoted:[/yellow] {args.name} v{args.version}: {decision.reason}")
        return NOT_PROMOTED
    console.print(f"{args.name} v{args.version} is champion ({decision.reason})")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from proxytune.stages.registration import rollback

    with _registry_errors():
        before, after = rollback(_registry_client(), args.name)
    console.print(f"{args.name}: champion v{before} -> v{after} (rolled back)")
    return 0
