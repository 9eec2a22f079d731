"""The layering rules (docs/architecture.md), checked on the source.

`toolkit` is built in layers, each importing only the layers below it; the recipes of the
embedded default sit beside the core, which never imports them; nothing imports in a
cycle; `toolkit` imports neither `plugins` nor `evaluations`, and those two use only
`toolkit`'s public API (`toolkit.__all__`), as a third-party package would.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import toolkit

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: toolkit's layers, lowest first: a module may import its own layer and those before it
LAYERS = [
    {"errors", "checks", "defaults", "lazy", "installed", "assets"},
    {"registry"},
    {"data"},
    {"conditions"},
    {"models"},
    {"sampling"},
    {"generation"},
    {"cli"},
]
#: beside the core: may import any layer up to `conditions`, and is imported by none
RECIPES = "recipes"


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path, *, typing: bool = False) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in a file, at any depth; those made for type checkers
    only (under ``if TYPE_CHECKING:``) with `typing`."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) and not typing:
            skipped |= {id(n) for child in node.body for n in ast.walk(child)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def part(module: str) -> str:
    """The layer part of a toolkit module: ``toolkit.models.detect`` -> ``models``."""
    return module.split(".")[1] if module.count(".") else ""


def rank(name: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if name in layer)


TOOLKIT = sorted(p for p in (ROOT / "toolkit").rglob("*.py") if p.name != "__init__.py"
                 or p.parent.name != "toolkit")  # fmt: skip


@pytest.mark.parametrize("path", TOOLKIT, ids=lambda p: str(p.relative_to(ROOT)))
def test_each_layer_imports_only_the_layers_below(path):
    source = part(module_name(path))
    for module, names in imports(path):
        if module.split(".")[0] in ("plugins", "evaluations"):
            pytest.fail(f"{path.name} imports {module}: toolkit knows no plugin or evaluation")
        if not module.startswith("toolkit"):
            continue
        targets = [part(module)] if part(module) else []
        if module == "toolkit":  # `from toolkit import x`: x is a layer or a public name
            targets = [n for n in names if (ROOT / "toolkit" / n).exists()
                       or (ROOT / "toolkit" / f"{n}.py").exists()]  # fmt: skip
        for target in targets:
            if source == RECIPES:
                if target != RECIPES:
                    # a recipe trains a model family's networks (the text recipe runs SD 3's
                    # folded attention), but never the sampling or generation above them
                    assert rank(target) <= rank("models"), f"recipes import {module}"
                continue
            assert target != RECIPES, (
                f"{path.name} imports {module}: the core never imports recipes"
            )
            assert rank(target) <= rank(source), (
                f"{path.name} (layer {source!r}) imports {module} (layer {target!r}, above it)"
            )


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (toolkit, plugins, evaluations)."""
    files = [p for top in ("toolkit", "plugins", "evaluations") for p in (ROOT / top).rglob("*.py")]
    known = {module_name(p) for p in files}
    graph: dict[str, set[str]] = {}
    for path in files:
        source = module_name(path)
        graph[source] = set()
        for module, names in imports(path):
            candidates = [f"{module}.{n}" for n in names] + [module]
            target = next((c for c in candidates if c in known), None)
            if target is not None and target != source and not source.startswith(target + "."):
                graph[source].add(target)
    return graph


def test_no_import_cycles():
    graph = import_graph()
    # the public API's package modules re-export (lazily) what lies below them: leave them out
    packages = {"toolkit", "plugins", "plugins.samplers", "evaluations"}
    graph = {
        m: {t for t in ts if t not in packages} for m, ts in graph.items() if m not in packages
    }
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def check_public_only(path: pathlib.Path) -> None:
    for module, names in imports(path, typing=True):
        if module.split(".")[0] != "toolkit":
            continue
        assert module == "toolkit", f"{path.name} imports {module}: use toolkit's public API"
        private = [n for n in names if n not in toolkit.__all__]
        assert not private, f"{path.name} imports {private} from toolkit, not in __all__"
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "toolkit"
        ):
            assert node.attr in toolkit.__all__, f"{path.name} uses toolkit.{node.attr}"


@pytest.mark.parametrize("path", sorted((ROOT / "evaluations").rglob("*.py")), ids=str)
def test_evaluations_use_only_the_public_toolkit_api(path):
    check_public_only(path)


@pytest.mark.parametrize("path", sorted((ROOT / "plugins").rglob("*.py")), ids=str)
def test_plugins_use_only_the_public_toolkit_api(path):
    """The built-in plugins are written as a third-party plugin must be: against `toolkit`'s
    public API, which is therefore enough to write any of them."""
    check_public_only(path)


def test_the_layer_rules_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import toolkit.sampling.denoiser\nfrom toolkit import generation\n")
    assert [m for m, _ in imports(bad)] == ["toolkit.sampling.denoiser", "toolkit"]
    bad.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import toolkit.x\n")
    assert [m for m, _ in imports(bad)] == ["typing"]


def test_every_public_name_resolves():
    for name in toolkit.__all__:
        assert getattr(toolkit, name) is not None, name
