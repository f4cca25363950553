"""The command line, above core/ and serve/: one module per subcommand, each with
add_parser(subparsers) and run(args); main.py builds the parser. Nothing imports this package."""

from .main import main

__all__ = ["main"]
