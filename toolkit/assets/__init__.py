"""Files shipped with the package: the generators and the attribute classifiers.

::

    toolkit/assets/generator/                 the embedded default model (`dtk generate`),
                                              label-conditioned; also named ``digits``
    toolkit/assets/text-generator/            the text-to-image model, named ``text-digits``
    toolkit/assets/classifiers/<attribute>/   model.safetensors + config.json + README.md,
                                              written by `dtk train-classifier` (small CNNs:
                                              the synthesis filters' classifiers)
    toolkit/assets/judges/<attribute>/        the same, small MLPs: the independent judges
                                              that audit what the CNNs filtered

Each asset's README.md holds the exact commands and seeds that produced it.
"""

from __future__ import annotations

import pathlib

from toolkit.errors import DtkError

ROOT = pathlib.Path(__file__).resolve().parent
CLASSIFIERS = ROOT / "classifiers"
JUDGES = ROOT / "judges"
GENERATOR = ROOT / "generator"
TEXT_GENERATOR = ROOT / "text-generator"
#: what `--model` accepts besides a folder: the shipped generators by name
MODELS = {"digits": GENERATOR, "text-digits": TEXT_GENERATOR}


def model_path(model: str | pathlib.Path) -> pathlib.Path:
    """`model` as a folder: a shipped generator's name (`MODELS`) names its folder unless a
    folder of that name exists where dtk runs; anything else is a path."""
    path = pathlib.Path(model)
    shipped = MODELS.get(str(model))
    if shipped is not None and not path.exists():
        return shipped
    return path


def generator_path() -> pathlib.Path | None:
    """The generator shipped with the package, if this installation has one."""
    shipped = (GENERATOR / "config.json").is_file() or (GENERATOR / "model_index.json").is_file()
    return GENERATOR if shipped else None


def classifier_attributes(folder: pathlib.Path = CLASSIFIERS) -> list[str]:
    """The attributes a shipped classifier predicts (``digit``, ``group``); with
    ``folder=JUDGES``, those a shipped judge predicts."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / "config.json").is_file())


def classifier_path(attribute: str, folder: pathlib.Path = CLASSIFIERS) -> pathlib.Path:
    """The folder of the shipped classifier (``folder=JUDGES``: judge) for `attribute`."""
    shipped = classifier_attributes(folder)
    if attribute not in shipped:
        what = "judge" if folder == JUDGES else "classifier"
        raise DtkError(
            f"no shipped {what} for attribute {attribute!r}; shipped: "
            f"{', '.join(shipped) or '(none)'} "
            "(or give path=FOLDER written by dtk train-classifier)"
        )
    return folder / attribute


def judge_attributes() -> list[str]:
    """The attributes a shipped judge predicts (``digit``, ``group``)."""
    return classifier_attributes(JUDGES)


def judge_path(attribute: str) -> pathlib.Path:
    """The folder of the shipped judge (a small MLP) for `attribute`."""
    return classifier_path(attribute, JUDGES)
