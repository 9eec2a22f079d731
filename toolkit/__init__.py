"""diffusion-toolkit: diffusion-model generation where every moving part is a plugin.

The public API::

    import toolkit
    toolkit.plugins()                          # DataFrame of every registered plugin
    toolkit.sampler("dpmpp_2m", **options)     # an instance, options validated
    toolkit.schedule("karras", rho=7.0)        # likewise guidance, safety_filter,
                                               # attribute_classifier
    toolkit.NoiseLevels.from_alphas_cumprod(a) # a model's training noise levels
    toolkit.generate(model, out=..., ...)      # the same run as `dtk generate`
    toolkit.load_image_folder(path, ["digit"]) # a dataset folder as tensors + metadata
    toolkit.read_words("words.toml")          # how attribute values are said in prompts

The names in `__all__` are the whole public API: `evaluations/` and third-party code use
only these. Importing `toolkit` does not import torch; that happens when something computes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from toolkit.checks import check_fraction, check_positive, check_seed, check_writable
from toolkit.errors import (
    DtkError,
    GenerationWarning,
    OptionError,
    PluginClashError,
    PluginError,
    PluginLoadWarning,
    UnknownPluginError,
)
from toolkit.hookspecs import hookimpl
from toolkit.noise import NoiseLevels
from toolkit.paths import inside, safe_name
from toolkit.protocols import AttributeClassifier, Sampler, Schedule
from toolkit.registry import get_registry

if TYPE_CHECKING:
    import pandas

__version__ = "0.1.0"

__all__ = [
    "AttributeClassifier",
    "DtkError",
    "GenerationWarning",
    "ImageDataset",
    "NoiseLevels",
    "OptionError",
    "PluginClashError",
    "PluginError",
    "PluginLoadWarning",
    "Sampler",
    "Schedule",
    "UnknownPluginError",
    "atomic_write",
    "attribute_classifier",
    "attribute_words",
    "check_fraction",
    "check_positive",
    "check_seed",
    "check_writable",
    "create_plugin",
    "default_model",
    "generate",
    "guidance",
    "hookimpl",
    "inside",
    "label_space",
    "load_image_folder",
    "natural_key",
    "parse_key_values",
    "plugins",
    "read_images",
    "read_metadata",
    "read_words",
    "resolve_device",
    "safe_name",
    "safety_filter",
    "sampler",
    "schedule",
    "target_distribution",
    "value_words",
    "versions",
    "write_colored_digits",
]


def plugins(kind: str | None = None) -> pandas.DataFrame:
    """Every registered plugin (and every plugin that failed to load) as a DataFrame.

    Columns: ``name``, ``kind``, ``distribution``, ``version``, ``status`` (``ok``, ``clash``,
    ``error``, ``disabled`` or ``not installed``) and ``error``. `kind` keeps one kind.
    """
    import pandas

    columns = ["name", "kind", "distribution", "version", "status", "error"]
    return pandas.DataFrame(get_registry().rows(kind), columns=columns)


def create_plugin(
    kind: str, name: str, options: Mapping[str, Any] | None = None, *, from_strings: bool = False
) -> Any:
    """An instance of plugin `name` of `kind` (``sampler``, ``schedule``, ``guidance``,
    ``safety_filter``, ``attribute_classifier``); with `from_strings`, option values are
    ``KEY=VALUE`` strings from a command line, converted by each option's annotation."""
    return get_registry().create(kind, name, options, from_strings=from_strings)


def sampler(name: str, /, **options: Any) -> Sampler:
    """An instance of sampler `name` (or ``dist:name``) with validated `options`."""
    return get_registry().create("sampler", name, options)


def schedule(name: str, /, **options: Any) -> Schedule:
    """An instance of noise schedule `name` (or ``dist:name``) with validated `options`."""
    return get_registry().create("schedule", name, options)


def guidance(name: str, /, **options: Any) -> Any:
    """An instance of guidance method `name` (or ``dist:name``) with validated `options`."""
    return get_registry().create("guidance", name, options)


def safety_filter(name: str, /, **options: Any) -> Any:
    """An instance of safety filter `name` (or ``dist:name``) with validated `options`."""
    return get_registry().create("safety_filter", name, options)


def attribute_classifier(name: str, /, **options: Any) -> AttributeClassifier:
    """An instance of attribute classifier `name` (or ``dist:name``) with validated `options`."""
    return get_registry().create("attribute_classifier", name, options)


# Heavier parts of the API load on first use, so `import toolkit` stays light.
_LAZY = {
    "generate": ("toolkit.generation", "generate"),
    "default_model": ("toolkit.generation", "default_model"),
    "resolve_device": ("toolkit.generation", "resolve_device"),
    "load_image_folder": ("toolkit.dataset_folder", "load_image_folder"),
    "read_metadata": ("toolkit.dataset_folder", "read_metadata"),
    "read_images": ("toolkit.dataset_folder", "read_images"),
    "natural_key": ("toolkit.dataset_folder", "natural_key"),
    "ImageDataset": ("toolkit.dataset_folder", "ImageDataset"),
    "atomic_write": ("toolkit.output", "atomic_write"),
    "label_space": ("toolkit.model", "label_space"),
    "parse_key_values": ("toolkit.options", "parse_key_values"),
    "target_distribution": ("toolkit.targets", "target_distribution"),
    "write_colored_digits": ("toolkit.colored_digits", "write"),
    "read_words": ("toolkit.words", "read_words"),
    "attribute_words": ("toolkit.words", "attribute_words"),
    "value_words": ("toolkit.words", "value_words"),
    "versions": ("toolkit.installed", "versions"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")
