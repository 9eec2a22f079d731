"""Exceptions and warnings raised by the toolkit.

Every error a user can cause by a bad name, option or value derives from `DtkError`, so the
CLI can turn it into one clear line (exit status 2) instead of a traceback.
"""

from __future__ import annotations


class DtkError(Exception):
    """Base class for errors caused by the user's input or environment."""


class UnknownPluginError(DtkError, LookupError):
    """No plugin of that kind has that name."""


class PluginClashError(DtkError, LookupError):
    """Two distributions register the same name for the same kind of plugin."""


class OptionError(DtkError, ValueError):
    """A plugin option is unknown or has a value of the wrong type."""


class PluginError(DtkError, RuntimeError):
    """A plugin failed while loading, registering or being instantiated."""


class PluginLoadWarning(UserWarning):
    """A plugin distribution could not be loaded and was skipped."""


class GenerationWarning(UserWarning):
    """Something went wrong with some samples of a run that still finished (the CLI shows
    it as one ``dtk: warning:`` line)."""
