"""Fixtures shared by several test modules."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest

import toolkit.registry.manager


@pytest.fixture
def make_dist(tmp_path, monkeypatch):
    """``make_dist(name, version, module=source, ...)`` installs distribution `name` into a
    folder on sys.path: the modules, and a ``.dist-info`` giving each module an entry point
    of its own name in the ``dtk`` group. The process-wide registry is reset, so the next
    use loads it."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(toolkit.registry.manager, "_default", None)
    modules: list[str] = []

    def make(name: str, version: str = "1.0", **sources: str) -> None:
        for module, source in sources.items():
            (site / f"{module}.py").write_text(textwrap.dedent(source))
            modules.append(module)
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        (info / "METADATA").write_text(metadata)
        entry_points = "".join(f"{module} = {module}\n" for module in sources)
        (info / "entry_points.txt").write_text("[dtk]\n" + entry_points)
        importlib.invalidate_caches()
        toolkit.registry.manager.reset_registry()

    yield make
    for module in modules:
        sys.modules.pop(module, None)
    toolkit.registry.manager.reset_registry()
