"""Packages whose names load on first use, so that importing a pure part of pyddl (the topology,
the settings, the recipe, the cost model) does not import torch."""

from __future__ import annotations

import importlib
import sys
import types
from typing import Callable

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """Return a package's `__getattr__` and `__dir__` for `exports` (name -> module holding it).

    Example (in a package's __init__.py):
        >>> __getattr__, __dir__ = lazy_exports(__name__, {"Recipe": "pyddl.train.recipe"})
    """
    module = sys.modules[package]
    namespace = module.__dict__

    class _Package(types.ModuleType):
        # Importing a submodule binds it on its package: `import pyddl.topology.spec` would
        # replace the function `pyddl.topology()` with the package `pyddl.topology`. An
        # exported name keeps its meaning; the submodule stays importable by its full name.
        def __setattr__(self, name, value):
            if name in exports and isinstance(value, types.ModuleType):
                return
            super().__setattr__(name, value)

    module.__class__ = _Package

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value  # later lookups skip this function
        return value

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
