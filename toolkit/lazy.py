"""Deferred imports, so that `dtk --help` and `dtk plugins` never pay for torch.

Plugin modules are imported when the registry lists them; modules that do numerical work
write ``torch = lazy_import("torch")`` and use ``torch.foo`` as usual. The real import
happens on first attribute access, i.e. when a plugin actually computes something.
"""

from __future__ import annotations

import importlib
import types
from typing import Any


class _LazyModule(types.ModuleType):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__dict__["_lazy_target"] = None

    def _load(self) -> types.ModuleType:
        module = self.__dict__["_lazy_target"]
        if module is None:
            module = importlib.import_module(self.__name__)
            self.__dict__["_lazy_target"] = module
        return module

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._load(), attr)

    def __dir__(self) -> list[str]:
        return dir(self._load())


def lazy_import(name: str) -> Any:
    """Return a stand-in for module `name` that imports it on first attribute access."""
    return _LazyModule(name)
