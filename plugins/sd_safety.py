"""The ``sd_safety_checker`` filter: Stable Diffusion's CLIP safety checker as a dtk filter.

It takes the decision diffusers' ``StableDiffusionSafetyChecker`` takes, but never blacks an
image out: it returns a verdict with the concept score, and ``--on-flag`` decides what happens.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import toolkit
from toolkit import OptionError, SampleRequest, Verdict, quiet_transformers

if TYPE_CHECKING:
    import torch

# what diffusers' checker adds to every concept score once a "special care" concept fired
SPECIAL_CARE_MARGIN = 0.01
# the checker rounds scores to this many decimals before comparing them with 0
DECIMALS = 3


class SDSafetyChecker:
    """Flags images that diffusers' Stable Diffusion safety checker would black out.

    `model` is a diffusers pipeline folder holding ``safety_checker/`` (safetensors weights)
    and ``feature_extractor/``. An image is flagged when any concept score
    ``round(cos(image, concept) - (threshold + threshold_adjustment) + special, 3)`` exceeds 0,
    where ``special`` is 0.01 when any "special care" concept fired (scored the same way) and
    0 otherwise. The verdict's score is the largest concept score, so ``flagged == score > 0``.
    A negative `threshold_adjustment` is stricter; it is minus diffusers' ``adjustment``.
    """

    name = "sd_safety_checker"

    def __init__(
        self,
        model: pathlib.Path,
        threshold_adjustment: float = 0.0,
        device: str = "cpu",
    ) -> None:
        checker_dir, extractor_dir = _component_dirs(pathlib.Path(model))

        import torch
        from diffusers.pipelines.stable_diffusion.safety_checker import (
            StableDiffusionSafetyChecker,
        )

        self.device = toolkit.resolve_device(device)
        with quiet_transformers():
            from transformers import CLIPImageProcessor

            checker = StableDiffusionSafetyChecker.from_pretrained(
                checker_dir, local_files_only=True, use_safetensors=True
            )
            self.feature_extractor = CLIPImageProcessor.from_pretrained(
                extractor_dir, local_files_only=True
            )
        self.checker = checker.to(self.device, torch.float32).eval()
        self.threshold_adjustment = float(threshold_adjustment)
        # read once: the thresholds are fixed weights, and the decision compares Python floats
        # with float32 similarities exactly as diffusers does
        self._concept_thresholds = self.checker.concept_embeds_weights.tolist()
        self._special_thresholds = self.checker.special_care_embeds_weights.tolist()

    def __call__(self, images: torch.Tensor, requests: Sequence[SampleRequest]) -> list[Verdict]:
        concept_cos, special_cos = self.similarities(images)
        return [self._verdict(c, s) for c, s in zip(concept_cos, special_cos)]

    def similarities(self, images: torch.Tensor):
        """Cosine similarities of each image's CLIP embedding with the concept embeddings and
        the special-care embeddings: two float32 numpy arrays ``[B, 17]`` and ``[B, 3]``."""
        import torch

        clip_input = self.feature_extractor(_to_pil(images), return_tensors="pt").pixel_values
        with torch.inference_mode():
            pooled = self.checker.vision_model(clip_input.to(self.device, torch.float32))[1]
            embeds = torch.nn.functional.normalize(self.checker.visual_projection(pooled))

            def cosine(concepts: torch.Tensor):
                unit = torch.nn.functional.normalize(concepts)
                return (embeds @ unit.T).cpu().float().numpy()

            return cosine(self.checker.concept_embeds), cosine(self.checker.special_care_embeds)

    def _verdict(self, concept_cos, special_cos) -> Verdict:
        # numpy float32 scalars minus Python floats, rounded with round(): the same arithmetic
        # as diffusers' checker, so a score on the boundary rounds the same way
        shift = -self.threshold_adjustment
        special = [
            round(cos - thr + shift, DECIMALS)
            for cos, thr in zip(special_cos, self._special_thresholds)
        ]
        special_fired = any(s > 0 for s in special)
        if special_fired:
            shift += SPECIAL_CARE_MARGIN
        scores = [
            round(cos - thr + shift, DECIMALS)
            for cos, thr in zip(concept_cos, self._concept_thresholds)
        ]
        fired = sum(s > 0 for s in scores)
        # back to a short decimal (0.123, not 0.12300000339...) with the same sign
        score = round(float(max(scores)), DECIMALS)
        if not fired:
            return Verdict(False, "", score)
        reason = f"{fired} of {len(scores)} NSFW concepts fired"
        if special_fired:
            reason += " (special-care concept: stricter thresholds)"
        return Verdict(True, reason, score)


def _component_dirs(model: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """The checker's and feature extractor's folders; a clear one-line error if unusable."""
    checker_dir, extractor_dir = model / "safety_checker", model / "feature_extractor"
    if not checker_dir.is_dir():
        raise OptionError(
            f"sd_safety_checker: {model} has no safety_checker/ folder; give model=PATH, a "
            "diffusers pipeline folder with safety_checker/ and feature_extractor/"
        )
    if not (checker_dir / "config.json").is_file():
        raise OptionError(f"sd_safety_checker: {checker_dir} has no config.json")
    if not any(checker_dir.glob("*.safetensors")):
        raise OptionError(
            f"sd_safety_checker: {checker_dir} holds no .safetensors weights "
            "(pickled checkpoints are not loaded)"
        )
    if not (extractor_dir / "preprocessor_config.json").is_file():
        raise OptionError(
            f"sd_safety_checker: {model} has no feature_extractor/preprocessor_config.json "
            "(the checker's CLIPImageProcessor)"
        )
    return checker_dir, extractor_dir


def _to_pil(images: torch.Tensor) -> list:
    """The pixels the writer saves (``toolkit.data.images.to_pixels``' rounding), as PIL images,
    which is what diffusers' pipeline hands the feature extractor."""
    from PIL import Image

    from toolkit import to_pixels

    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 1 or 3, H, W], got shape {tuple(images.shape)}")
    pixels = to_pixels(images)
    if pixels.shape[-1] == 1:
        return [Image.fromarray(p[..., 0]) for p in pixels]
    return [Image.fromarray(p) for p in pixels]


@toolkit.hookimpl
def register_safety_filters(register: toolkit.Register) -> None:
    register(SDSafetyChecker)
