"""The `pyddl` command: one subcommand per module of this package.

Each subcommand module exposes `register(subparsers)`, which adds its parser and sets
`func` (called with the parsed namespace, returning an exit code). Modules are imported
lazily so `pyddl run` does not pay for matplotlib or torchvision.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main"]

# name -> module that registers it, in the order `pyddl --help` lists them.
_SUBCOMMANDS = {
    "run": "pyddl.cli.run",
    "bench": "pyddl.cli.bench",
    "simulate": "pyddl.cli.simulate",
    "train": "pyddl.cli.train",
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyddl",
        description="Fully synchronous distributed training for PyTorch with a topology-aware "
        "multiring allreduce.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in _SUBCOMMANDS.values():
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
