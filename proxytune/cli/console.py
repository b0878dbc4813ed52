"""The CLI's terminal output, shared by every command group: one console, the scores table
and the exit codes a command returns besides 0 and 2."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console(soft_wrap=True)  # paths and commands stay copy-pasteable
NOT_PROMOTED = 3  # `submit --wait`: the run registered a version that did not become champion
INTERRUPTED = 130


def print_scores(metrics: dict, title: str) -> None:
    table = Table(title=title)
    table.add_column("method")
    for label in ("CLIP-I", "CLIP-T", "DINO"):
        table.add_column(label, justify="right")
    for method, scores in metrics.items():
        table.add_row(method, *(f"{scores[k]:.4f}" for k in ("clip_i", "clip_t", "dino")))
    console.print(table)
