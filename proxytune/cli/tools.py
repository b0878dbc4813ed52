"""`generate` (images from a tuned student), `convert-vqgan` (Lumina-mGPT's tokenizer),
`presets` and `backends` (what a run can be given).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from proxytune.cli.console import console


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add `backends`, `presets`, `generate` and `convert-vqgan`."""
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


def _generate(args: argparse.Namespace) -> int:
    import tempfile

    from proxytune.serving.generate import check_request, generate_images, resolve_student

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


def _presets(args: argparse.Namespace) -> int:
    from proxytune.core.config import PRESETS, RunParams, parameter_bounds, preset_values

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
    from proxytune.core.registry import REGISTRIES

    table = Table(title="proxytune backends")
    for column in ("kind", "name", "description"):
        table.add_column(column)
    for kind, registry in REGISTRIES.items():
        for name, description in registry.describe().items():
            table.add_row(kind, name, description)
    console.print(table)
    return 0
