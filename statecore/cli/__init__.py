"""The command line: ``python -m statecore COMMAND``; one module per command (see ``main``)."""

from statecore.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
