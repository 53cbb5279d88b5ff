"""The `pyddl` command: one subcommand per module of this package.

Each subcommand module exposes `register(subparsers)`, which adds its parser and sets
`func` (called with the parsed namespace, returning an exit code). Modules are imported
lazily so `pyddl run` does not pay for matplotlib or torchvision. No parser takes an
abbreviated flag (`--epoch` is not `--epochs`); a flag a subcommand does not know is
reported with that subcommand's usage and the closest flag it has.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from importlib import metadata

__all__ = ["main"]

# name -> module that registers it, in the order `pyddl --help` lists them.
_SUBCOMMANDS = {
    "run": "pyddl.cli.run",
    "bench": "pyddl.cli.bench",
    "simulate": "pyddl.cli.simulate",
    "train": "pyddl.cli.train",
}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser without abbreviations whose subcommands report unknown flags
    themselves (argparse leaves them to the top-level parser, whose usage does not help)."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self._subparsers is None:
            self.error(f"unrecognized arguments: {' '.join(extras)}{self._suggestion(extras)}")
        return namespace, extras

    def _suggestion(self, extras: list[str]) -> str:
        known = [s for action in self._actions for s in action.option_strings]
        for word in extras:
            if word.startswith("-"):
                close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1, cutoff=0.6)
                if close:
                    return f"; did you mean {close[0]}?"
        return ""


def _version() -> str:
    try:
        return metadata.version("pyddl")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyddl",
        description="Fully synchronous distributed training for PyTorch with a topology-aware "
        "multiring allreduce.",
    )
    parser.add_argument("--version", action="version", version=f"pyddl {_version()}")
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
