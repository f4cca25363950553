"""One module per CLI subcommand; each has add_parser(subparsers) and run(args)."""

from . import devices, generate, make_checkpoint

COMMANDS = [devices, generate, make_checkpoint]
