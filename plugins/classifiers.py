"""Built-in attribute classifier: ``cnn``, the small CNNs `dtk train-classifier` writes.

Without options it serves the shipped ``digit`` classifier; ``attribute=group`` serves the
shipped group classifier; ``path=FOLDER`` serves any folder written by
``dtk train-classifier``.
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING

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

    def __init__(self, path: pathlib.Path | None = None, attribute: str | None = None) -> None:
        from toolkit import classifier_path, load_classifier

        folder = classifier_path(attribute or "digit") if path is None else pathlib.Path(path)
        self._classifier = load_classifier(folder)
        if attribute is not None and attribute != self._classifier.attribute:
            raise OptionError(
                f"cnn: {folder} predicts {self._classifier.attribute!r}, not {attribute!r}"
            )
        self.path = folder
        self.attribute: str = self._classifier.attribute
        self.labels: list[str] = self._classifier.labels

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, len(labels)]`` probabilities for float images ``[B, C, H, W]`` in [0, 1]."""
        return self._classifier.predict_proba(images)


@toolkit.hookimpl
def register_attribute_classifiers(register: toolkit.Register) -> None:
    register(CNN)
