"""The package's layering: an import graph without cycles, no private names imported across
modules, and one root for every error the package raises on purpose."""
from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from qc_pipeline.errors import QCPipelineError

ROOT = Path(__file__).resolve().parents[2]
#: repository folders and the import names setup.cfg installs them under
FOLDERS = {"qc_pipeline": "qc_pipeline", "workflows": "qc_pipeline.workflows",
           "models": "qc_pipeline.models", "templates": "qc_pipeline.templates"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, name in FOLDERS.items():
        for f in (ROOT / folder).rglob("*.py"):
            parts = list(f.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([name, *parts])] = f
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(modules: dict[str, Path], *, top_level_only: bool):
    """``{module: [(imported module, [names], line)]}`` for the package's own modules."""
    graph = {}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        edges = []
        for node in nodes:
            if isinstance(node, ast.ImportFrom):
                target = _resolve(mod, path.name == "__init__.py", node)
                names = [a.name for a in node.names]
                # "from pkg import submodule" imports the submodule
                subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
                for t in subs or [target]:
                    if t in modules:
                        edges.append((t, [] if subs else names, node.lineno))
            elif isinstance(node, ast.Import):
                edges += [(a.name, [], node.lineno) for a in node.names if a.name in modules]
        graph[mod] = edges
    return graph


def _cycle(graph) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t, _, _ in graph.get(m, []):
            # a package's own __init__ importing its submodules is how packages are built
            if m.startswith(t + "."):
                continue
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_walk_sees_the_package():
    mods = _modules()
    assert "qc_pipeline.qc.score" in mods and "qc_pipeline.workflows.interfaces" in mods
    graph = _imports(mods, top_level_only=True)
    assert ("qc_pipeline.modelcard", ["load_model_card"]) in [(t, n) for t, n, _ in
                                                               graph["qc_pipeline.adapt"]]


def test_no_import_cycle_at_module_level():
    assert _cycle(_imports(_modules(), top_level_only=True)) is None


@pytest.mark.parametrize("top_level_only", [False])
def test_no_import_cycle_even_through_function_level_imports(top_level_only):
    # a lazy import inside a function hides a cycle from Python, not from a reader
    assert _cycle(_imports(_modules(), top_level_only=top_level_only)) is None


def test_no_private_name_imported_from_another_module():
    bad = []
    for mod, edges in _imports(_modules(), top_level_only=False).items():
        for target, names, line in edges:
            if target == mod:
                continue
            bad += [f"{mod}:{line} imports {target}.{n}" for n in names
                    if n.startswith("_") and not n.startswith("__")]
    assert bad == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": [("b", [], 1)], "b": [("c", [], 1)], "c": [("a", [], 1)]}) == ["a", "b", "c", "a"]


#: signals that stop a run, not errors: they must get past ``except Exception``
CONTROL_FLOW = {"qc_pipeline.cli.runtime.Terminated", "qc_pipeline.cli.runtime.WorkDirGone"}


def _package_exceptions():
    found = {}
    for name in sorted(_modules()):
        if name.startswith("qc_pipeline.templates") or name.startswith("qc_pipeline.models."):
            continue
        mod = importlib.import_module(name)
        for cls_name, cls in vars(mod).items():
            if (inspect.isclass(cls) and issubclass(cls, BaseException) and not issubclass(cls, Warning)
                    and cls.__module__ == name and not cls_name.startswith("_")):
                found[f"{name}.{cls_name}"] = cls
    return found


def test_every_typed_error_derives_from_the_one_root():
    found = _package_exceptions()
    assert "qc_pipeline.errors.NoBrainError" in found and "qc_pipeline.bids.NoScansFound" in found
    outside = sorted(n for n, cls in found.items()
                     if n not in CONTROL_FLOW and not issubclass(cls, QCPipelineError))
    assert outside == []


def test_the_root_keeps_the_builtin_kinds_callers_catch():
    from qc_pipeline.errors import ModelNotFoundError, NoBrainError

    assert issubclass(NoBrainError, ValueError) and issubclass(ModelNotFoundError, FileNotFoundError)
    assert issubclass(ModelNotFoundError, QCPipelineError)
