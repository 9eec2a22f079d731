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

The names in `__all__` are the whole public API: `evaluations/`, the built-in `plugins/`
and third-party code use only these. Importing `toolkit` does not import torch; that
happens when something computes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from toolkit.checks import check_fraction, check_positive, check_seed, check_writable
from toolkit.data.paths import inside, safe_name
from toolkit.errors import (
    DtkError,
    GenerationWarning,
    OptionError,
    PluginClashError,
    PluginError,
    PluginLoadWarning,
    UnknownPluginError,
)
from toolkit.lazy import lazy_import
from toolkit.models.noise import NoiseLevels
from toolkit.registry.hookspecs import hookimpl
from toolkit.registry.manager import get_registry
from toolkit.registry.protocols import (
    AttributeClassifier,
    Denoiser,
    Guidance,
    GuidanceOptions,
    GuideModel,
    NoiseSource,
    Perturbation,
    Register,
    SafetyFilter,
    SafetyFilterOptions,
    Sampler,
    SampleRequest,
    Schedule,
    StepCache,
    StepCacheOptions,
    StepCallback,
    Verdict,
    with_unconditional,
)
from toolkit.registry.protocols import optional as optional_member

if TYPE_CHECKING:
    import pandas

__version__ = "0.1.0"


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


def step_cache(name: str, /, **options: Any) -> StepCache:
    """An instance of step cache `name` (or ``dist:name``) with validated `options`."""
    return get_registry().create("step_cache", name, options)


# Heavier parts of the API load on first use, so `import toolkit` stays light.
_LAZY = {
    "generate": ("toolkit.generation.generate", "generate"),
    "default_model": ("toolkit.generation.generate", "default_model"),
    "resolve_device": ("toolkit.generation.run", "resolve_device"),
    "reuse_models": ("toolkit.generation.reuse", "reuse_models"),
    "GenerationSettings": ("toolkit.generation.request", "GenerationSettings"),
    "check_settings": ("toolkit.generation.plan", "check_settings"),
    "generation_options": ("toolkit.cli.options", "generation_options"),
    "engine_options": ("toolkit.cli.options", "engine_options"),
    "check_engine": ("toolkit.generation.engines", "check_engine_options"),
    "format_options": ("toolkit.cli.options", "format_options"),
    "settings_from_cli": ("toolkit.cli.options", "settings_from_cli"),
    "load_image_folder": ("toolkit.data.dataset_folder", "load_image_folder"),
    "read_metadata": ("toolkit.data.dataset_folder", "read_metadata"),
    "read_images": ("toolkit.data.dataset_folder", "read_images"),
    "read_dataset_images": ("toolkit.data.dataset_folder", "read_dataset_images"),
    "image_sources": ("toolkit.data.dataset_folder", "image_sources"),
    "iter_image_bytes": ("toolkit.data.dataset_folder", "iter_image_bytes"),
    "open_image": ("toolkit.data.dataset_folder", "open_image"),
    "ShardedImage": ("toolkit.data.dataset_folder", "ShardedImage"),
    "check_format": ("toolkit.data.shards", "check_format"),
    "write_shards": ("toolkit.data.shards", "write_shards"),
    "natural_key": ("toolkit.data.dataset_folder", "natural_key"),
    "ImageDataset": ("toolkit.data.dataset_folder", "ImageDataset"),
    "atomic_write": ("toolkit.data.output", "atomic_write"),
    "label_space": ("toolkit.models", "label_space"),
    "parse_key_values": ("toolkit.registry.options", "parse_key_values"),
    "target_distribution": ("toolkit.conditions.targets", "target_distribution"),
    "write_colored_digits": ("toolkit.recipes.colored_digits", "write"),
    "read_words": ("toolkit.conditions.words", "read_words"),
    "attribute_words": ("toolkit.conditions.words", "attribute_words"),
    "value_words": ("toolkit.conditions.words", "value_words"),
    "versions": ("toolkit.installed", "versions"),
    "quiet_transformers": ("toolkit.models.loading", "quiet_transformers"),
    "to_pixels": ("toolkit.data.images", "to_pixels"),
    "encode_png": ("toolkit.data.images", "encode_png"),
    "image_grid": ("toolkit.data.images", "grid"),
    "fit_size": ("toolkit.data.images", "fit_size"),
    "quantile_draw": ("toolkit.conditions.targets", "quantile_draw"),
    "seeded_uniform": ("toolkit.conditions.targets", "seeded_uniform"),
    "classifier_path": ("toolkit.assets", "classifier_path"),
    "judge_path": ("toolkit.assets", "judge_path"),
    "judge_attributes": ("toolkit.assets", "judge_attributes"),
    # a network's structure, for plugins that hook its blocks (step caches)
    "transformer_blocks": ("toolkit.models.blocks", "transformer_blocks"),
    "is_unet": ("toolkit.models.blocks", "is_unet"),
    "unet_layers": ("toolkit.models.blocks", "unet_layers"),
    "block_output_indices": ("toolkit.models.blocks", "output_indices"),
    "bound_arguments": ("toolkit.models.blocks", "bound_arguments"),
    "take_rows": ("toolkit.models.blocks", "take_rows"),
    "replaced_forwards": ("toolkit.models.blocks", "replaced_forwards"),
    "load_classifier": ("toolkit.recipes.classifier", "load_classifier"),
}

#: the whole public API: `evaluations/`, `plugins/` and third-party code use only these
__all__ = [
    "AttributeClassifier",
    "Denoiser",
    "DtkError",
    "GenerationSettings",
    "GenerationWarning",
    "Guidance",
    "GuidanceOptions",
    "GuideModel",
    "ImageDataset",
    "NoiseLevels",
    "NoiseSource",
    "OptionError",
    "Perturbation",
    "PluginClashError",
    "PluginError",
    "PluginLoadWarning",
    "Register",
    "SafetyFilter",
    "SafetyFilterOptions",
    "SampleRequest",
    "Sampler",
    "Schedule",
    "ShardedImage",
    "StepCache",
    "StepCacheOptions",
    "StepCallback",
    "UnknownPluginError",
    "Verdict",
    "atomic_write",
    "attribute_classifier",
    "attribute_words",
    "block_output_indices",
    "bound_arguments",
    "check_engine",
    "check_format",
    "check_fraction",
    "check_positive",
    "check_seed",
    "check_settings",
    "check_writable",
    "classifier_path",
    "create_plugin",
    "default_model",
    "encode_png",
    "engine_options",
    "fit_size",
    "format_options",
    "generate",
    "generation_options",
    "guidance",
    "hookimpl",
    "image_grid",
    "image_sources",
    "inside",
    "is_unet",
    "iter_image_bytes",
    "judge_attributes",
    "judge_path",
    "label_space",
    "lazy_import",
    "load_classifier",
    "load_image_folder",
    "natural_key",
    "open_image",
    "optional_member",
    "parse_key_values",
    "plugins",
    "quantile_draw",
    "quiet_transformers",
    "read_dataset_images",
    "read_images",
    "read_metadata",
    "read_words",
    "replaced_forwards",
    "resolve_device",
    "reuse_models",
    "safe_name",
    "safety_filter",
    "sampler",
    "schedule",
    "seeded_uniform",
    "settings_from_cli",
    "step_cache",
    "take_rows",
    "target_distribution",
    "to_pixels",
    "transformer_blocks",
    "unet_layers",
    "value_words",
    "versions",
    "with_unconditional",
    "write_colored_digits",
    "write_shards",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")
