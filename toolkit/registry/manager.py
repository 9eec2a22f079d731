"""Plugin discovery: one registry for every kind of plugin, fed only by entry points.

Built-in plugins (distribution ``diffusion-toolkit``) and third-party ones are found the same
way, through the ``dtk`` entry-point group. Loading follows what pytest, llm and conda learned
the hard way:

* each entry point is loaded inside try/except; a plugin that fails to import, whose hooks do
  not validate, or whose hook raises is reported (a `PluginLoadWarning`, and a row with status
  ``error`` in ``dtk plugins``) and skipped. ``DTK_STRICT_PLUGINS=1`` re-raises instead;
* ``DTK_LOAD_PLUGINS=dist-a,dist-b`` allow-lists third-party distributions (empty: none);
  the built-in plugins always load;
* two distributions registering one name for one kind is a clash, never settled by load
  order: the bare name is refused with a message naming both, and ``dist:name`` picks one.
  Commands (``dtk NAME``) have no ``dist:name``: a built-in command always keeps its
  name, and a clashing third-party command is listed as a clash and not added;
* a plugin cannot end or silence the process that loads it: ``sys.exit()`` at import or
  in a hook is a load error like any other, and ``sys.stdout``/``sys.stderr`` are put back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import pluggy

from toolkit.errors import (
    DtkError,
    PluginClashError,
    PluginError,
    PluginLoadWarning,
    UnknownPluginError,
)
from toolkit.registry import hookspecs
from toolkit.registry.options import validate_options

BUILTIN_DISTRIBUTION = "diffusion-toolkit"
ENTRY_POINT_GROUP = "dtk"

#: kind -> the hook that registers plugins of that kind
KINDS: dict[str, str] = {
    "schedule": "register_schedules",
    "sampler": "register_samplers",
    "guidance": "register_guidance",
    "safety_filter": "register_safety_filters",
    "attribute_classifier": "register_attribute_classifiers",
    "step_cache": "register_step_caches",
    "command": "register_commands",
}

#: the method an instance of a kind must define where it is not ``__call__`` (None: none)
REQUIRED_METHOD = {"attribute_classifier": None, "step_cache": "attach"}

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def canonical_distribution(name: str) -> str:
    """PEP 503 normalisation, so ``My_Plugin`` and ``my-plugin`` name one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclasses.dataclass(frozen=True)
class Registration:
    """A plugin class registered under a name for one kind."""

    kind: str
    name: str
    cls: type
    distribution: str
    version: str

    @property
    def qualified_name(self) -> str:
        return f"{self.distribution}:{self.name}"

    @property
    def builtin(self) -> bool:
        return canonical_distribution(self.distribution) == BUILTIN_DISTRIBUTION

    def provenance(self) -> dict[str, str]:
        """What a run records about the plugin it used."""
        return {
            "kind": self.kind,
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
        }


@dataclasses.dataclass(frozen=True)
class LoadProblem:
    """An entry point that was not loaded: broken, disabled or not installed."""

    entry_point: str
    distribution: str
    version: str
    status: str  # "error", "disabled" or "not installed"
    error: str


class Registry:
    """All plugins of every kind, discovered from the ``dtk`` entry-point group.

    Loading is lazy (on first use) and happens once. `entry_points` and `environ` exist for
    tests; by default the installed entry points and ``os.environ`` are used.
    """

    def __init__(
        self,
        entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._entry_points = entry_points
        self._environ = os.environ if environ is None else environ
        self._loaded = False
        self._registrations: list[Registration] = []
        self._problems: list[LoadProblem] = []
        self._errors_by_registration: dict[tuple[str, str, str], str] = {}

    # -- loading -----------------------------------------------------------------------

    @property
    def strict(self) -> bool:
        return self._environ.get("DTK_STRICT_PLUGINS", "").strip().lower() in {"1", "true", "yes"}

    def _allow_list(self) -> set[str] | None:
        value = self._environ.get("DTK_LOAD_PLUGINS")
        if value is None:
            return None
        return {canonical_distribution(v.strip()) for v in value.split(",") if v.strip()}

    def load(self) -> Registry:
        if self._loaded:
            return self
        try:
            self._load()
        except BaseException:
            # strict mode re-raised: leave no half-loaded registry behind
            self._registrations, self._problems = [], []
            self._errors_by_registration = {}
            raise
        self._loaded = True
        return self

    def _load(self) -> None:
        """Import the allowed entry points, then collect their plugins kind by kind; each
        step skips (and reports) what is broken rather than failing the whole registry."""
        entry_points = self._entry_points
        if entry_points is None:
            entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        allow = self._allow_list()
        manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        manager.add_hookspecs(hookspecs)
        owners: dict[str, tuple[str, str]] = {}  # pluggy plugin name -> (distribution, version)
        seen_distributions = set()
        # 1. Import each allowed entry point and register its hooks with pluggy.
        for ep in entry_points:
            dist, version = _distribution(ep)
            seen_distributions.add(canonical_distribution(dist))
            if not self._allowed(ep, dist, version, allow):
                continue
            try:
                plugin_name = _register_module(manager, ep, dist)
            except Exception as exc:
                self._fail(ep.name, dist, version, "failed to load", exc)
                continue
            owners[plugin_name] = (dist, version)
        # 2. Say which allow-listed distributions are not installed (a typo, most likely).
        if allow:
            self._report_not_installed(allow - seen_distributions)
        # 3. Call every loaded plugin's hooks, kind by kind: they register the classes.
        for kind, hook_name in KINDS.items():
            caller = getattr(manager.hook, hook_name)
            for impl in caller.get_hookimpls():
                dist, version = owners[impl.plugin_name]
                self._call_hook(impl, kind, hook_name, dist, version)
        # 4. Mark the names two distributions registered for one kind.
        self._mark_clashes()

    def _allowed(self, ep: Any, dist: str, version: str, allow: set[str] | None) -> bool:
        """Whether `ep` may load: built-ins always, third parties if ``DTK_LOAD_PLUGINS``
        (when set) names them; a left-out one is listed as ``disabled``."""
        canonical = canonical_distribution(dist)
        if canonical == BUILTIN_DISTRIBUTION or allow is None or canonical in allow:
            return True
        self._problems.append(
            LoadProblem(ep.name, dist, version, "disabled", "not in DTK_LOAD_PLUGINS")
        )
        return False

    def _report_not_installed(self, missing: set[str]) -> None:
        """Distributions ``DTK_LOAD_PLUGINS`` names that are not installed: listed and warned
        about, since a misspelt name would otherwise silently load nothing."""
        for name in sorted(missing):
            self._problems.append(
                LoadProblem("", name, "", "not installed", "named in DTK_LOAD_PLUGINS")
            )
            warnings.warn(
                f"DTK_LOAD_PLUGINS names {name!r}, which is not an installed dtk "
                "plugin distribution",
                PluginLoadWarning,
                stacklevel=5,  # `_load` used 4; this method is one frame deeper
            )

    def _call_hook(self, impl: Any, kind: str, hook_name: str, dist: str, version: str) -> None:
        pending: list[Registration] = []

        def register(cls: type) -> None:
            if kind == "command":
                pending.append(_command_registration(cls, dist, version, pending))
                return
            name = getattr(cls, "name", None)
            if not isinstance(cls, type):
                raise PluginError(f"register() takes a class, got {cls!r}")
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise PluginError(
                    f"{cls.__qualname__} needs a class attribute 'name': a string of letters, "
                    f"digits, '_', '-' or '.' (got {name!r})"
                )
            # what the toolkit calls on an instance: the instance itself, for most kinds
            method = REQUIRED_METHOD.get(kind, "__call__")
            if method and not any(method in vars(k) for k in cls.__mro__[:-1]):
                raise PluginError(f"{kind} class {cls.__qualname__} must define {method}()"
                                  if method != "__call__" else
                                  f"{kind} class {cls.__qualname__} must be callable")  # fmt: skip
            if any(r.name == name for r in pending):
                raise PluginError(f"{kind} {name!r} is registered twice")
            pending.append(Registration(kind, name, cls, dist, version))

        kwargs = {arg: register for arg in impl.argnames}
        try:
            with _contained():
                impl.function(**kwargs)
        except Exception as exc:
            entry_point = impl.plugin_name.split(":", 1)[1]
            self._fail(entry_point, dist, version, f"{hook_name}() failed", exc)
            return
        self._registrations.extend(pending)

    def _fail(self, entry_point: str, dist: str, version: str, what: str, exc: Exception) -> None:
        if self.strict:
            raise exc
        message = f"{type(exc).__name__}: {exc}"
        self._problems.append(LoadProblem(entry_point, dist, version, "error", message))
        warnings.warn(
            f"dtk plugin {dist} {version} (entry point {entry_point!r}) {what} and was "
            f"skipped: {message}. Set DTK_STRICT_PLUGINS=1 to see the traceback.",
            PluginLoadWarning,
            stacklevel=4,
        )

    def _mark_clashes(self) -> None:
        by_key: dict[tuple[str, str], list[Registration]] = {}
        for reg in self._registrations:
            by_key.setdefault((reg.kind, reg.name), []).append(reg)
        for (kind, name), regs in by_key.items():
            builtin = [r for r in regs if r.builtin]
            if kind == "command" and builtin:
                # a built-in command keeps its name: `dtk eval` is never someone else's
                for reg in regs:
                    if not reg.builtin:
                        self._errors_by_registration[(kind, name, reg.distribution)] = (
                            f"the built-in command {name!r} cannot be replaced; this one is "
                            "not added"
                        )
                continue
            if len(regs) > 1:
                for reg in regs:
                    others = [o.distribution for o in regs if o is not reg]
                    self._errors_by_registration[(reg.kind, reg.name, reg.distribution)] = (
                        f"name also registered by {', '.join(others)}; use {reg.qualified_name!r}"
                    )

    # -- queries -------------------------------------------------------------------------

    @property
    def registrations(self) -> list[Registration]:
        return list(self.load()._registrations)

    @property
    def problems(self) -> list[LoadProblem]:
        return list(self.load()._problems)

    def names(self, kind: str) -> list[str]:
        _check_kind(kind)
        return sorted({r.name for r in self.registrations if r.kind == kind})

    def rows(self, kind: str | None = None) -> list[dict[str, str | None]]:
        """The plugin listing: one record per registration or load problem."""
        if kind is not None:
            _check_kind(kind)
        rows: list[dict[str, str | None]] = []
        for reg in self.registrations:
            if kind is not None and reg.kind != kind:
                continue
            error = self._errors_by_registration.get((reg.kind, reg.name, reg.distribution))
            rows.append(
                {
                    "name": reg.name,
                    "kind": reg.kind,
                    "distribution": reg.distribution,
                    "version": reg.version,
                    "status": "clash" if error else "ok",
                    "error": error,
                }
            )
        rows.sort(key=lambda r: (list(KINDS).index(r["kind"]), r["name"], r["distribution"]))
        if kind is None:
            for problem in self.problems:
                rows.append(
                    {
                        "name": problem.entry_point,
                        "kind": None,
                        "distribution": problem.distribution,
                        "version": problem.version,
                        "status": problem.status,
                        "error": problem.error,
                    }
                )
        return rows

    def commands(self) -> dict[str, Any]:
        """The ``dtk`` subcommands by name: every registered command that is not a clash."""
        return {
            reg.name: reg.cls
            for reg in self.registrations
            if reg.kind == "command"
            and (reg.kind, reg.name, reg.distribution) not in self._errors_by_registration
        }

    def get(self, kind: str, name: str) -> Registration:
        """The registration for `name` (or ``dist:name``); clear errors when there is none."""
        _check_kind(kind)
        label = kind.replace("_", " ")
        dist, sep, bare = name.rpartition(":")
        candidates = [r for r in self.registrations if r.kind == kind and r.name == bare]
        if sep:
            candidates = [
                r
                for r in candidates
                if canonical_distribution(r.distribution) == canonical_distribution(dist)
            ]
        if not candidates:
            choices = self.names(kind)
            message = f"unknown {label} {name!r}. Choose one of: {', '.join(choices) or '(none)'}"
            broken = [p for p in self.problems if p.status == "error"]
            if broken:
                message += " (not loaded: " + ", ".join(p.distribution for p in broken) + ")"
            raise UnknownPluginError(message)
        if len(candidates) > 1:
            dists = " and ".join(repr(r.distribution) for r in candidates)
            picks = " or ".join(repr(r.qualified_name) for r in candidates)
            raise PluginClashError(
                f"{label} {bare!r} is registered by both {dists}; choose one as {picks}"
            )
        return candidates[0]

    def create(
        self,
        kind: str,
        name: str,
        options: Mapping[str, Any] | None = None,
        *,
        from_strings: bool = False,
    ) -> Any:
        """Instantiate plugin `name` of `kind` with validated `options`."""
        kwargs = self.validate(kind, name, options, from_strings=from_strings)
        return self.instantiate(kind, name, kwargs)

    def validate(
        self,
        kind: str,
        name: str,
        options: Mapping[str, Any] | None = None,
        *,
        from_strings: bool = False,
    ) -> dict[str, Any]:
        """`options` checked against plugin `name`'s signature (and converted from strings
        with `from_strings`): the keyword arguments `instantiate` takes."""
        reg = self.get(kind, name)
        label = kind.replace("_", " ")
        return validate_options(
            reg.cls, options or {}, kind=label, name=name, from_strings=from_strings
        )

    def instantiate(self, kind: str, name: str, kwargs: Mapping[str, Any]) -> Any:
        """Plugin `name` made from already validated `kwargs`; its own errors become a
        `PluginError` naming its distribution."""
        reg = self.get(kind, name)
        try:
            with _contained():
                return reg.cls(**kwargs)
        except DtkError:
            raise
        except Exception as exc:
            raise PluginError(
                f"{kind.replace('_', ' ')} {name!r} from {reg.distribution} {reg.version} "
                f"failed to start: {type(exc).__name__}: {exc}"
            ) from exc


def _distribution(ep: importlib.metadata.EntryPoint) -> tuple[str, str]:
    """The name and version of the distribution that declares `ep`."""
    if ep.dist is None:
        return "(unknown)", ""
    return ep.dist.name, ep.dist.version


def _register_module(
    manager: pluggy.PluginManager, ep: importlib.metadata.EntryPoint, dist: str
) -> str:
    """Import `ep`'s module and register its hooks under ``dist:name`` (returned)."""
    plugin_name = f"{dist}:{ep.name}"
    with _contained():
        module = ep.load()
    try:
        manager.register(module, name=plugin_name)
        manager.check_pending()
    except Exception:
        # register() may fail half-way (a hook with a bad signature), leaving the
        # plugin's earlier hooks behind: take all of them out.
        if manager.get_plugin(plugin_name) is module:
            manager.unregister(name=plugin_name)
        raise
    return plugin_name


def _command_registration(
    command: Any, dist: str, version: str, pending: list[Registration]
) -> Registration:
    """A ``register_commands`` registration: a click command, under its own name."""
    import click

    if not isinstance(command, click.Command):
        raise PluginError(f"register_commands takes click commands, got {command!r}")
    name = command.name
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PluginError(f"command name {name!r} is not a valid dtk subcommand name")
    if any(r.name == name for r in pending):
        raise PluginError(f"command {name!r} is registered twice")
    return Registration("command", name, command, dist, version)


@contextlib.contextmanager
def _contained() -> Iterator[None]:
    """Run plugin code so that it cannot end or silence the process: ``sys.exit()`` becomes
    an ordinary error (reported against the plugin like any other), and replaced standard
    streams are put back."""
    streams = sys.stdout, sys.stderr
    try:
        yield
    except SystemExit as exc:
        raise RuntimeError(f"sys.exit({exc.code!r}) was called") from None
    finally:
        sys.stdout, sys.stderr = streams


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown plugin kind {kind!r}; one of: {', '.join(KINDS)}")


_default: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _default
    if _default is None:
        _default = Registry()
    return _default.load()


def reset_registry() -> None:
    """Forget the process-wide registry (after installing a plugin at run time, say)."""
    global _default
    _default = None
