"""The package's shape: pure modules load without torch, no two modules import each other
(directly or around a circle), and every registered algorithm is where the registry says."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PURE = [
    "pyddl",
    "pyddl.config",
    "pyddl.env",
    "pyddl.errors",
    "pyddl.defaults",
    "pyddl.topology",
    "pyddl.comm.registry",
    "pyddl.comm.layout",
    "pyddl.comm.names",
    "pyddl.sim",
    "pyddl.sim.cost",
    "pyddl.sim.step",
    "pyddl.train",
    "pyddl.train.recipe",
    "pyddl.train.config",
    "pyddl.launch.config",
    "pyddl.bench.options",
    "pyddl.bench.systems",
]

_BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is blocked: this module must load without torch")
sys.meta_path.insert(0, Block())
import importlib
for name in sys.argv[1:]:
    importlib.import_module(name)
print("torch" in sys.modules)
"""


@pytest.mark.timeout(60)
def test_pure_modules_import_with_torch_blocked():
    done = subprocess.run([sys.executable, "-c", _BLOCK_TORCH, *PURE], capture_output=True, text=True,
                          cwd=SRC, timeout=50)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


@pytest.mark.timeout(60)
def test_pure_settings_and_topology_work_without_torch():
    code = _BLOCK_TORCH.replace('print("torch" in sys.modules)', (
        "from pyddl.config import Settings\n"
        "from pyddl.topology import Topology\n"
        "from pyddl.topology.spec import sub_topology\n"
        "s = Settings.from_env({'PYDDL_ALLREDUCE': 'multiring'}, timeout_s=5)\n"
        "print(s.allreduce, s.timeout_s, sub_topology(Topology((2, 2)), [0, 2]).dims)"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=SRC, timeout=50)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["multiring", "5.0", "(1,", "2)"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every import of a pyddl module by a pyddl module, wherever it stands in the file."""
    modules = {_module_name(p): p for p in (SRC / "pyddl").rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


@pytest.mark.timeout(60)
def test_no_import_cycles():
    graph = _imports()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == [], f"modules that import each other: {cycles}"


def test_the_core_never_imports_the_facade_or_an_adapter():
    graph = _imports()
    below = [m for m in graph if m.startswith(("pyddl.comm", "pyddl.topology"))]
    above = {"pyddl", "pyddl.api", "pyddl.runtime"} | {m for m in graph if m.startswith(("pyddl.torch", "pyddl.cli"))}
    assert {m: sorted(graph[m] & above) for m in below if graph[m] & above} == {}


def test_every_registered_algorithm_has_its_entry_point():
    import importlib

    from pyddl.comm.registry import ALGORITHMS, load_algorithm

    for name, module in ALGORITHMS.items():
        assert load_algorithm(name) is importlib.import_module(module).allreduce_
    with pytest.raises(ValueError, match="choose one of native, multiring, auto"):
        load_algorithm("ring")
