"""The ``fdfast`` command: parse -> config -> call. Each subcommand lives in its own module.

A command module exposes ``register(subparsers)`` (adds its parser, sets ``func``); bad input raises
FDFastError, printed here as one line with exit code 2 (no traceback). COMMANDS lists exactly the commands
that exist: a listed module that fails to import is an error, never a silently missing command.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from fdfast.errors import FDFastError

# (command, the module whose register() adds it); one module may register several commands.
COMMANDS = [
    ("train", "fdfast.train"),
    ("finetune", "fdfast.finetune"),
    ("knn", "fdfast.evaluate"),
    ("linprobe", "fdfast.evaluate"),
    ("diagnose", "fdfast.diagnostics.command"),
    ("export", "fdfast.models.export"),
    ("shards", "fdfast.data.shards"),
    ("plan", "fdfast.plan"),
    ("teachers", "fdfast.models.teachers"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fdfast", description="Feature Distillation, fast.")
    from fdfast import __version__
    parser.add_argument("--version", action="version", version=f"fdfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in dict.fromkeys(m for _, m in COMMANDS):  # each module once, in listed order
        importlib.import_module(module_name).register(sub)
    listed = [c for c, _ in COMMANDS]
    if sorted(sub.choices) != sorted(listed):  # a programming error: COMMANDS and the modules disagree
        raise RuntimeError(f"fdfast.cli.COMMANDS lists {listed}, but its modules registered {list(sub.choices)}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (None: this process's own command line, which ends when main returns); returns
    the exit code."""
    from fdfast.signals import raise_deferred, startup_interrupts
    command = "fdfast"
    try:
        # SIGTERM from here on, imports included: exit 130 and one line, as Ctrl-C; ignored once the process's own
        # command is done (argv None: the console script, `python -m fdfast`), so its exit stays the command's
        with startup_interrupts(exiting=argv is None):
            parser = build_parser()
            raise_deferred()
            args = parser.parse_args(argv)
            if not getattr(args, "func", None):
                parser.print_help()
                return 2
            command = f"fdfast {args.command}"
            return int(args.func(args) or 0)
    except FDFastError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"{command}: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
