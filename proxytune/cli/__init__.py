"""The `proxytune` command: `run --local`, `bench`, `gc`, `generate`, `convert-vqgan`, `compile`,
`upload`, `submit`, `schedule`, `models`, `promote`, `rollback`, `backends`, `presets`, `study`.

One module per command group adds its subcommands (`add_commands`) and handles them; the work
itself is in `proxytune.ops` and the library below it. The top layer: it may import every
other, and only it and `ops` import KFP, `components` and `pipelines`."""

from __future__ import annotations

import argparse
import logging

from rich.markup import escape

from proxytune.cli import kubeflow, registry, runs, study, tools
from proxytune.cli.console import INTERRUPTED, console

EXIT_CODES = """exit codes:
  0    done
  1    a run failed (the step and its cause are printed and in summary.json)
  2    bad input or arguments, an unreachable server or an unwritable path: refused, nothing ran
  3    submit --wait: the run's version was registered but not promoted
  130  interrupted (Ctrl-C)
--debug shows the Python traceback of any of these."""

GROUPS = (runs, kubeflow, registry, tools, study)  # the order of `proxytune --help`


def main(argv: list[str] | None = None) -> int:
    """The CLI. An expected failure prints one line and exits with its code (EXIT_CODES);
    only a bug shows a traceback, unless --debug."""
    parser = build_parser()
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


def build_parser() -> argparse.ArgumentParser:
    from proxytune import __version__

    parser = argparse.ArgumentParser(
        prog="proxytune",
        description=__doc__.split("\n\n")[0],
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"proxytune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of failures")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_commands(commands)
    return parser
