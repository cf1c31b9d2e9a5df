"""``python -m statecore <command>``: one thin dispatcher over ``statecore.cli``.

Each command lives in ``statecore/cli/<name>.py`` and exposes ``register(subparsers)``
(adds its parser and sets ``func``) so that commands can be added without touching the others.
Command modules import heavy libraries inside ``run`` so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from statecore.errors import StatecoreError

COMMANDS = ("prepare", "train", "predict", "baseline", "evaluate", "embed", "simulate", "screen")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m statecore",
        description="Train and run the State model on Perturb-seq data: prepare -> train -> predict / baseline "
        "-> evaluate (embed: the State Embedding model). `python -m statecore COMMAND -h` for options.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"statecore.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"statecore.cli.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except StatecoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
