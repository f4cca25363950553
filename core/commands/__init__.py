"""One module per CLI subcommand; each has add_parser(subparsers) and run(args)."""

from . import bench, chat, conformance, devices, generate, make_checkpoint, serve

COMMANDS = [devices, generate, chat, serve, bench, conformance, make_checkpoint]
