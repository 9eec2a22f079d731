"""What loading a model folder shares, whatever the model: the weights rule and quiet loads.

Weights load from safetensors; pickled weights (``.bin``, ``.ckpt``) only when the user
trusts their source, because unpickling can run arbitrary code (DESIGN.md, "Weights").
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator

from toolkit.errors import DtkError


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
