"""The ``fdfast`` command: parse -> config -> call. Each subcommand lives in its own module.

A command module exposes ``register(subparsers)`` (adds its parser, sets ``func``) ; bad input raises
FDFastError, printed here as one line with exit code 2 (no traceback).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from fdfast.errors import FDFastError

# (command, module): a module that does not exist yet simply leaves its command out.
COMMANDS = [
    ("train", "fdfast.train"),
    ("finetune", "fdfast.finetune"),
    ("linprobe", "fdfast.finetune"),
    ("diagnose", "fdfast.diagnostics.command"),
    ("export", "fdfast.models.export"),
    ("plan", "fdfast.plan"),
    ("teachers", "fdfast.models.teachers"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fdfast", description="Feature Distillation, fast.")
    from fdfast import __version__
    parser.add_argument("--version", action="version", version=f"fdfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    registered = set()
    for _, module_name in COMMANDS:
        if module_name in registered:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                continue  # that command has not been built
            raise
        module.register(sub)
        registered.add(module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FDFastError as e:
        print(f"fdfast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"fdfast {args.command}: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
