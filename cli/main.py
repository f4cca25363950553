"""`ernie-hal <command>`: the subcommands live beside this file in cli/, one module each."""

from __future__ import annotations

import argparse
import sys

from . import bench, chat, conformance, devices, generate, make_checkpoint, quantize, serve

COMMANDS = [devices, generate, chat, serve, bench, conformance, make_checkpoint, quantize]

# Errors a user can fix get one line on stderr and exit code 2; anything else is a bug and
# keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, RuntimeError, OSError, MemoryError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ernie-hal", description="Run ERNIE-4.5 text models on any hardware.")
    subparsers = parser.add_subparsers(dest="command")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
