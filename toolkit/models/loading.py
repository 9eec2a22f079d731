"""What loading a model folder shares, whatever the model: config files, the noise a
scheduler config describes, the weights rule and quiet loads.

Weights load from safetensors; pickled weights (``.bin``, ``.ckpt``) only when the user
trusts their source, because unpickling can run arbitrary code (docs/contracts.md, "Weights").
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

from toolkit.errors import DtkError
from toolkit.models.noise import BETA_SCHEDULES

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def read_config(path: pathlib.Path) -> dict[str, Any]:
    """A JSON config file of a model folder; one clear line when it is missing or corrupt."""
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise DtkError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise DtkError(f"{path}: corrupt config file: {exc}") from None


def unet_shape(config: Mapping[str, Any]) -> tuple[int, int, int]:
    """(channels, height, width) a UNet config samples in."""
    size = config.get("sample_size", 32)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return (int(config.get("in_channels", 3)), int(height), int(width))


def check_prediction_type(folder: pathlib.Path, config: dict[str, Any]) -> str:
    """The prediction type a scheduler config names, and its noise levels checked as far as
    the config alone tells (`NoiseLevels.from_scheduler_config` makes them at load)."""
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise DtkError(f"{folder}: unsupported prediction_type {prediction_type!r}")
    if config.get("rescale_betas_zero_snr"):
        raise DtkError(f"{folder}: scheduler configs with rescale_betas_zero_snr are not "
                       "supported")  # fmt: skip
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is None and schedule not in BETA_SCHEDULES:
        raise DtkError(f"{folder}: unsupported beta_schedule {schedule!r}; supported: "
                       f"{', '.join(BETA_SCHEDULES)}")  # fmt: skip
    return prediction_type


def use_safetensors(folder: pathlib.Path, stem: str, trust_pickle: bool) -> bool:
    """True to load `folder`'s safetensors weights, False for trusted pickled ones; a clear
    error when there are only untrusted pickled weights, or none."""
    if any(folder.glob(f"{stem}*.safetensors")) or any(folder.glob("*.safetensors")):
        return True
    if any(folder.glob("*.bin")) or any(folder.glob("*.ckpt")):
        if not trust_pickle:
            raise DtkError(
                f"{folder} has only pickled weights, and unpickling can run arbitrary code; "
                "convert them to safetensors, or pass --trust-pickle if you trust the source"
            )
        return False
    raise DtkError(f"{folder}: no weights ({stem}.safetensors)")


_SIZE_MISMATCH = re.compile(
    r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) "
    r"from checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)"
)


def load_failure(folder: pathlib.Path, part: str, exc: BaseException) -> DtkError:
    """One line for a component that failed to load: loaders raise many types with
    messages of up to hundreds of lines (one per tensor whose shape does not fit)."""
    message = str(exc)
    mismatches = _SIZE_MISMATCH.findall(message)
    if mismatches:
        name, saved, expected = mismatches[0]
        return DtkError(
            f"{folder}: the {part}'s weights do not fit its config.json: {len(mismatches)} "
            f"tensor(s) differ in shape (first: {name} is {saved} in the weights, "
            f"{expected} by the config)"
        )
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    if len(first) > 300:
        first = first[:297] + "..."
    return DtkError(f"{folder}: cannot load the {part}: {type(exc).__name__}: {first}")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Without transformers' weight-loading progress bar and its info and warning logs (such
    as "requires torchvision ... falling back", printed when an image processor is first
    imported), which would land on stderr, dtk's own progress and one-line-error channel (and
    ignore ``-q``); the user's settings are restored afterwards."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if enabled:
            hf_logging.enable_progress_bar()
