"""Built-in attribute classifiers: ``cnn`` and ``mlp``, the small networks
`dtk train-classifier` writes.

Without options ``cnn`` serves the shipped ``digit`` classifier and ``attribute=group`` the
shipped group classifier: the ones synthesis filters with. ``mlp`` serves the shipped
judges, small MLPs of another family, trained with another seed and other augmentations,
for auditing what a ``cnn`` filtered (an audit by the filter's own classifier measures the
filter, not the images). ``path=FOLDER`` serves any folder written by
``dtk train-classifier`` (of the plugin's family).
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, ClassVar

import toolkit
from toolkit import OptionError

if TYPE_CHECKING:
    import torch


class CNN:
    """A small CNN attribute classifier (`toolkit.recipes.classifier`).

    `path`: a folder written by ``dtk train-classifier``; default: the shipped classifier
    for `attribute`. `attribute`: what to predict; default ``digit`` (with `path`, the
    folder's attribute, which `attribute` must then match).
    """

    name = "cnn"
    #: what config.json's architecture must name
    architecture: ClassVar[str] = "small-cnn"

    def __init__(self, path: pathlib.Path | None = None, attribute: str | None = None) -> None:
        from toolkit import load_classifier

        folder = self.shipped(attribute or "digit") if path is None else pathlib.Path(path)
        self._classifier = load_classifier(folder)
        family = self._classifier.config["architecture"]["name"]
        if family != self.architecture:
            raise OptionError(f"{self.name}: {folder} holds a {family}, not a {self.architecture}")
        if attribute is not None and attribute != self._classifier.attribute:
            raise OptionError(
                f"{self.name}: {folder} predicts {self._classifier.attribute!r}, not {attribute!r}"
            )
        self.path = folder
        self.attribute: str = self._classifier.attribute
        self.labels: list[str] = self._classifier.labels

    @staticmethod
    def shipped(attribute: str) -> pathlib.Path:
        from toolkit import classifier_path

        return classifier_path(attribute)

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, len(labels)]`` probabilities for float images ``[B, C, H, W]`` in [0, 1]."""
        return self._classifier.predict_proba(images)


class MLP(CNN):
    """A small MLP attribute classifier (`toolkit.recipes.classifier`): the independent judge.

    `path`: a folder written by ``dtk train-classifier --architecture mlp``; default: the
    shipped judge for `attribute`. `attribute`: what to predict; default ``digit``.
    """

    name = "mlp"
    architecture: ClassVar[str] = "small-mlp"

    @staticmethod
    def shipped(attribute: str) -> pathlib.Path:
        from toolkit import judge_path

        return judge_path(attribute)


@toolkit.hookimpl
def register_attribute_classifiers(register: toolkit.Register) -> None:
    register(CNN)
    register(MLP)
