"""``clear-adapters`` command line: list, info, demo, generate, bench, matrix, push, ...

Each group of subcommands lives in ``clear_adapters.commands.<group>`` and registers itself through
``register(subparsers)``, so features stay in their own modules. Nothing heavy is imported here or
by those modules at import time (torch, diffusers and peft are imported inside the commands that
need them), so ``--help``, ``--version``, ``list`` and ``info NAME`` start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .commands.common import third_party_quiet, torch_threads

COMMAND_MODULES = ("core", "bench", "hub", "matrix", "distill")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="clear-adapters", description="CLEAR linear attention for FLUX models")
    parser.add_argument("--version", action="version", version=f"clear-adapters {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress (INFO level) and show third-party warnings (hidden by default)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback when a command fails")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"clear_adapters.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from .commands.failures import run_command

    with third_party_quiet(args.verbose), torch_threads(getattr(args, "threads", None)):
        return run_command(args.func, args, debug=args.debug)  # a failure is one line and status 2 (1 if a bug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
