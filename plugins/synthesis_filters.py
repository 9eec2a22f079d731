"""Filters for synthetic training data: ``label_consistency`` and ``memorization``.

Synthetic data is only useful when each image shows what its label says and is not a copy
of a training image. Both are image-stage safety filters with scores, so ``dtk synthesize``
(and any ``dtk generate --filter ...``) records why a sample was rejected and regenerates it.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import toolkit
from toolkit import OptionError, SampleRequest, Verdict

if TYPE_CHECKING:
    import torch


class LabelConsistency:
    """Flags a sample unless an attribute classifier confirms its requested values.

    For each of `attributes` that the request specifies, the classifier plugin `classifier`
    (created with ``attribute=NAME`` and `classifier_options`, a mapping from Python, e.g. a
    ``clip`` model's path and labels) must give the requested value probability at least
    `threshold`. The score is the smallest such probability (None when the request specifies
    none of `attributes`: nothing to check).
    """

    name = "label_consistency"

    def __init__(
        self,
        attributes: list[str] | None = None,
        threshold: float = 0.5,
        classifier: str = "cnn",
        classifier_options=None,  # a mapping; unannotated: the option system takes it as is
    ) -> None:
        attributes = list(attributes or ["group"])
        if not 0 <= threshold <= 1:
            raise OptionError("label_consistency: threshold must be in [0, 1]")
        self.threshold = threshold
        self.classifiers = {}
        for attribute in attributes:
            options = {**dict(classifier_options or {}), "attribute": attribute}
            # string values (from a command line) convert by type; others pass as given
            instance = toolkit.create_plugin(
                "attribute_classifier", classifier, options, from_strings=True
            )
            if instance.attribute != attribute:
                raise OptionError(
                    f"label_consistency: classifier {classifier!r} predicts "
                    f"{instance.attribute!r}, not {attribute!r}"
                )
            self.classifiers[attribute] = instance

    def __call__(self, images: torch.Tensor, requests: Sequence[SampleRequest]) -> list[Verdict]:
        scores: list[float | None] = [None] * len(requests)
        reasons = [""] * len(requests)
        for attribute, classifier in self.classifiers.items():
            judged = [k for k, r in enumerate(requests) if attribute in r.conditions]
            if not judged:
                continue
            probabilities = classifier.predict_proba(images[judged]).float().cpu()
            for row, k in enumerate(judged):
                value = requests[k].conditions[attribute]
                if value not in classifier.labels:
                    raise OptionError(
                        f"label_consistency: the {attribute} classifier has no label "
                        f"{value!r} (its labels: {', '.join(classifier.labels)})"
                    )
                p = float(probabilities[row, classifier.labels.index(value)])
                if scores[k] is None or p < scores[k]:
                    scores[k] = p
                    reasons[k] = f"{attribute}={value} has probability {p:.2f}"
        verdicts = []
        for score, reason in zip(scores, reasons):
            if score is None:
                verdicts.append(Verdict(False, "", None))
            elif score < self.threshold:
                verdicts.append(Verdict(True, f"{reason} < {self.threshold}", score))
            else:
                verdicts.append(Verdict(False, "", score))
        return verdicts


class Memorization:
    """Flags a sample that is a near copy of a training image (Carlini et al. 2023).

    The score is the distance to the nearest image of the dataset folder `data`, as
    root-mean-square pixel difference in [0, 1] (L2 normalised by the number of values);
    below `threshold` the sample is flagged as a copy. Training images are resized to the
    samples' size.
    """

    name = "memorization"

    def __init__(self, data: pathlib.Path, threshold: float = 0.05) -> None:
        if threshold < 0:
            raise OptionError("memorization: threshold must be >= 0")
        self.data = pathlib.Path(data)
        self.threshold = threshold
        self._dataset = toolkit.load_image_folder(self.data)
        self._flat: dict[tuple[int, ...], torch.Tensor] = {}

    def _reference(self, shape: tuple[int, ...]) -> torch.Tensor:
        import torch.nn.functional as F

        if shape not in self._flat:
            images = self._dataset.images
            if images.shape[1] != shape[0]:
                raise OptionError(
                    f"memorization: {self.data} has {images.shape[1]}-channel images, the "
                    f"samples have {shape[0]}"
                )
            if tuple(images.shape[-2:]) != shape[1:]:
                images = F.interpolate(images, size=shape[1:], mode="bilinear", antialias=True)
            self._flat[shape] = images.flatten(1)
        return self._flat[shape]

    def __call__(self, images: torch.Tensor, requests: Sequence[SampleRequest]) -> list[Verdict]:
        import torch

        images = images.float().cpu()
        reference = self._reference(tuple(images.shape[1:]))
        distances = torch.cdist(images.flatten(1), reference) / math.sqrt(reference.shape[1])
        nearest, index = distances.min(dim=1)
        names = self._dataset.metadata["file_name"]
        verdicts = []
        for distance, j in zip(nearest.tolist(), index.tolist()):
            if distance < self.threshold:
                reason = f"copy of {names.iloc[j]} (distance {distance:.3f} < {self.threshold})"
                verdicts.append(Verdict(True, reason, distance))
            else:
                verdicts.append(Verdict(False, "", distance))
        return verdicts


@toolkit.hookimpl
def register_safety_filters(register: toolkit.Register) -> None:
    register(LabelConsistency)
    register(Memorization)
