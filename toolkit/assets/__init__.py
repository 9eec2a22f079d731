"""Files shipped with the package: the default generator and the attribute classifiers.

::

    toolkit/assets/generator/                 the embedded default model (`dtk generate`)
    toolkit/assets/classifiers/<attribute>/   model.safetensors + config.json + README.md,
                                              written by `dtk train-classifier`

Each asset's README.md holds the exact commands and seeds that produced it.
"""

from __future__ import annotations

import pathlib

from toolkit.errors import DtkError

ROOT = pathlib.Path(__file__).resolve().parent
CLASSIFIERS = ROOT / "classifiers"
GENERATOR = ROOT / "generator"


def generator_path() -> pathlib.Path | None:
    """The generator shipped with the package, if this installation has one."""
    shipped = (GENERATOR / "config.json").is_file() or (GENERATOR / "model_index.json").is_file()
    return GENERATOR if shipped else None


def classifier_attributes() -> list[str]:
    """The attributes a shipped classifier predicts (``digit``, ``group``)."""
    if not CLASSIFIERS.is_dir():
        return []
    return sorted(p.name for p in CLASSIFIERS.iterdir() if (p / "config.json").is_file())


def classifier_path(attribute: str) -> pathlib.Path:
    """The folder of the shipped classifier for `attribute`."""
    shipped = classifier_attributes()
    if attribute not in shipped:
        raise DtkError(
            f"no shipped classifier for attribute {attribute!r}; shipped: "
            f"{', '.join(shipped) or '(none)'} "
            "(or give path=FOLDER written by dtk train-classifier)"
        )
    return CLASSIFIERS / attribute
