"""The ``napari-sam-ft`` command line: one entry point, one module per group of subcommands.

Each module in ``COMMAND_MODULES`` defines ``register(subparsers)``; every subcommand sets
``run=function(args) -> exit code``. The functions are thin: they parse, call the same engine
functions the napari widgets call, and print.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ("napari_sam_ft.cli.engine_commands", "napari_sam_ft.cli.finetune", "napari_sam_ft.cli.session",
                   "napari_sam_ft.cli.bench", "napari_sam_ft.cli.batch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-sam-ft",
        description="Segment 3D CT/MRI with Segment Anything slice by slice, offline, and fine-tune it with LoRA.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:  # a command group not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    from ..models.checkpoints import CheckpointError
    from ..engine.prompts import PromptError
    from ..volume import VolumeError

    try:
        return int(args.run(args) or 0)
    except (VolumeError, CheckpointError, PromptError, ValueError, IndexError, RuntimeError) as error:
        # One clear line for bad input; a traceback helps nobody who gave a wrong file.
        print(f"napari-sam-ft {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"napari-sam-ft {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
