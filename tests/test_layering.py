"""The package's structure, read with ``ast``: layers import one way, passes reuse library cores, not passes.

* Layers: ``frontend`` ← ``passes.execution`` ← ``passes`` ← ``backends`` ← ``plugins`` ← ``tools``; a module
  imports bitpass modules of its own layer or of layers to its left only (imports inside functions count).
  ``bitpass.passes.execution`` (the ONNX Runtime session factory) sits alone right above ``frontend``.
* No module calls another pass's ``run`` (composites call the library core the pass wraps, or run passes
  through ``Pipeline`` / ``Sequential``, which give them the caller's instruments and checks). The pass
  runner itself (``passes/pipeline.py``) is the one place that calls ``run``.
* No module reaches a private (``_name``) attribute of another bitpass module: imported by name, read off an
  imported module, or read off a class defined elsewhere (or an instance built from it on the spot).

Each rule is also checked against a snippet that breaks it, so the checker itself can fail.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bitpass.passes.infra import Pass
from bitpass.passes.pipeline import Sequential

ROOT = Path(__file__).resolve().parents[1]
#: folder -> package, as pyproject's package-dir maps them
PACKAGES = {"frontend": "bitpass.frontend", "passes": "bitpass.passes", "backends": "bitpass.backends",
            "plugins": "bitpass.plugins", "tools": "bitpass.tools"}
#: left to right: a module may import its own layer and layers to its left
LAYERS = ["bitpass.frontend", "bitpass.passes.execution", "bitpass.passes", "bitpass.backends", "bitpass.plugins",
          "bitpass.tools"]
#: the modules that run passes by design
PASS_RUNNERS = {"bitpass.passes.pipeline"}


def layer_of(module: str) -> int:
    """Index in ``LAYERS`` of the longest prefix naming ``module``'s layer."""
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS.index(best)


@dataclass(frozen=True)
class Source:
    module: str
    path: Path
    tree: ast.Module


def package_sources() -> list[Source]:
    sources = []
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT / folder)
            if any(part.startswith("bitpass-") for part in relative.parts):  # the sample plugin: its own package
                continue
            parts = [*relative.with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            module = ".".join([package, *parts])
            sources.append(Source(module, path, ast.parse(path.read_text(), str(path))))
    return sources


def imported_modules(source: Source) -> Iterator[tuple[int, str]]:
    """(line, bitpass module) for every import in ``source``, at any depth."""
    for node in ast.walk(source.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("bitpass."):
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bitpass."):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                # ``from bitpass.passes import execution`` imports a module; ``from x import Name`` imports from x
                yield node.lineno, name if _is_module(name) else node.module


def _is_module(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def layering_violations(source: Source) -> list[str]:
    mine = layer_of(source.module)
    return [f"{source.path.name}:{line}: {source.module} ({LAYERS[mine]}) imports {name} ({LAYERS[layer_of(name)]})"
            for line, name in imported_modules(source) if layer_of(name) > mine]


class _Names:
    """What the names of a module stand for: its globals after import, and every name any import binds."""

    def __init__(self, source: Source, namespace: dict[str, object] | None = None) -> None:
        self.source = source
        if namespace is None:  # a __main__ module runs when imported: its names come from its imports alone
            namespace = {} if source.module.endswith(".__main__") else vars(importlib.import_module(source.module))
        self.namespace = namespace
        self.imports: dict[str, str] = {}  # local name -> "module" or "module.attr"
        for node in ast.walk(source.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self.imports[(alias.asname or alias.name).split(".")[0]] = alias.asname and alias.name or \
                        alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    self.imports[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def resolve(self, expr: ast.expr) -> object | None:
        if isinstance(expr, ast.Name):
            if expr.id in self.imports:
                return _load(self.imports[expr.id])
            return self.namespace.get(expr.id)
        if isinstance(expr, ast.Attribute):
            base = self.resolve(expr.value)
            return getattr(base, expr.attr, None) if base is not None else None
        return None

    def home(self, obj: object) -> str | None:
        """The bitpass module that defines ``obj`` (a module, class or function), else None."""
        name = getattr(obj, "__name__", None) if isinstance(obj, type(ast)) else getattr(obj, "__module__", None)
        return name if isinstance(name, str) and name.startswith("bitpass.") else None


def _load(dotted: str) -> object | None:
    try:
        return importlib.import_module(dotted)
    except ImportError:
        module, _, attr = dotted.rpartition(".")
        try:
            return getattr(importlib.import_module(module), attr, None)
        except ImportError:
            return None


def _is_pass_class(obj: object) -> bool:
    return isinstance(obj, type) and issubclass(obj, Pass) and not issubclass(obj, Sequential)


def pass_run_violations(source: Source, names: _Names | None = None) -> list[str]:
    """Calls of ``run`` on a pass built on the spot (``Quantize(...).run``) or bound to a name first."""
    if source.module in PASS_RUNNERS:
        return []
    names = names or _Names(source)
    found = []
    scopes = [n for n in ast.walk(source.tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module))]
    for scope in scopes:
        instances: dict[str, str] = {}
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                cls = names.resolve(node.value.func)
                if _is_pass_class(cls):
                    for target in node.targets:
                        if isinstance(target, ast.Name):
                            instances[target.id] = cls.__name__
        for node in ast.walk(scope):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "run"):
                continue
            receiver = node.func.value
            cls = names.resolve(receiver.func) if isinstance(receiver, ast.Call) else None
            if _is_pass_class(cls):
                found.append(f"{source.path.name}:{node.lineno}: calls {cls.__name__}(...).run")
            elif isinstance(receiver, ast.Name) and receiver.id in instances:
                found.append(f"{source.path.name}:{node.lineno}: calls run of a {instances[receiver.id]} pass")
    return sorted(set(found))


def private_access_violations(source: Source, names: _Names | None = None) -> list[str]:
    names = names or _Names(source)
    found = []
    for node in ast.walk(source.tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bitpass."):
            for alias in node.names:
                if _private(alias.name) and node.module != source.module:
                    found.append(f"{source.path.name}:{node.lineno}: imports {node.module}.{alias.name}")
        if isinstance(node, ast.Attribute) and _private(node.attr):
            receiver = node.value.func if isinstance(node.value, ast.Call) else node.value
            if not isinstance(receiver, (ast.Name, ast.Attribute)):
                continue
            owner = names.home(names.resolve(receiver))
            if owner is not None and owner != source.module:
                found.append(f"{source.path.name}:{node.lineno}: reads {ast.unparse(node)} ({owner})")
    return sorted(set(found))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


SOURCES = package_sources()


def test_every_package_folder_is_read():
    assert {s.module for s in SOURCES} >= {"bitpass.passes.execution", "bitpass.passes.quantize",
                                            "bitpass.backends.onnxruntime.runner", "bitpass.tools.cli"}


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.module)
def test_imports_go_one_way(source):
    assert layering_violations(source) == []


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.module)
def test_no_module_runs_another_pass(source):
    assert pass_run_violations(source) == []


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.module)
def test_no_module_reaches_into_another_modules_privates(source):
    assert private_access_violations(source) == []


# --- the checker catches what it is meant to catch -----------------------------------------------------------

def _snippet(module: str, text: str) -> Source:
    return Source(module, Path(module.replace(".", "/") + ".py"), ast.parse(text))


def test_an_upward_import_is_caught_even_inside_a_function():
    source = _snippet("bitpass.passes.pruning.recovery",
                      "def f():\n    from bitpass.backends.onnxruntime.runner import OrtRunner\n")
    assert layering_violations(source) == [
        "recovery.py:2: bitpass.passes.pruning.recovery (bitpass.passes) imports "
        "bitpass.backends.onnxruntime.runner (bitpass.backends)"]
    execution = _snippet("bitpass.passes.execution", "from bitpass.passes import infra\n")
    assert layering_violations(execution) and not layering_violations(
        _snippet("bitpass.passes.quantize", "from bitpass.passes import execution\n"))


def test_running_a_pass_from_a_module_is_caught():
    source = _snippet("bitpass.passes.allocation.evaluate",
                      "from bitpass.passes.quantize import Quantize\n"
                      "def f(m, c):\n    Quantize(preprocess=False).run(m, c)\n"
                      "def g(m, c):\n    q = Quantize()\n    return q.run(m, c)\n"
                      "def h(m, c, p):\n    return Sequential(p).run(m, c)\n")
    names = _Names(source, namespace={"Sequential": Sequential})
    assert pass_run_violations(source, names) == ["evaluate.py:3: calls Quantize(...).run",
                                                  "evaluate.py:6: calls run of a Quantize pass"]


def test_reading_another_modules_private_is_caught():
    source = _snippet("bitpass.tools.bench_pruning",
                      "from bitpass.passes.quantize import _quiet\n"
                      "from bitpass.passes.pruning.structured import PruneChannels\n"
                      "from bitpass.tools import bench_mixed as bm\n"
                      "def f(r):\n    PruneChannels._group(r)\n    return PruneChannels(ratio=0.5)._count(3)\n"
                      "def g():\n    return bm._prepare()\n")
    names = _Names(source, namespace={})
    assert private_access_violations(source, names) == [
        "bench_pruning.py:1: imports bitpass.passes.quantize._quiet",
        "bench_pruning.py:5: reads PruneChannels._group (bitpass.passes.pruning.structured)",
        "bench_pruning.py:6: reads PruneChannels(ratio=0.5)._count (bitpass.passes.pruning.structured)",
        "bench_pruning.py:8: reads bm._prepare (bitpass.tools.bench_mixed)"]
