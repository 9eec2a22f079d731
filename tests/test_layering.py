"""The layering rules of DESIGN.md, checked on the source: `toolkit` imports neither
`plugins` nor `evaluations`; `evaluations` uses only `toolkit`'s public API."""

from __future__ import annotations

import ast
import pathlib

import pytest

import toolkit

ROOT = pathlib.Path(__file__).resolve().parent.parent


def imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every import statement in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "toolkit").rglob("*.py")), ids=str)
def test_toolkit_imports_neither_plugins_nor_evaluations(path):
    for module, _ in imports(path):
        assert module.split(".")[0] not in ("plugins", "evaluations"), (path, module)


@pytest.mark.parametrize("path", sorted((ROOT / "evaluations").rglob("*.py")), ids=str)
def test_evaluations_use_only_the_public_toolkit_api(path):
    for module, names in imports(path):
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


def test_every_public_name_resolves():
    for name in toolkit.__all__:
        assert getattr(toolkit, name) is not None, name
