"""Safe Latent Diffusion (Schramowski et al. 2023, "Safe Latent Diffusion: Mitigating
Inappropriate Degeneration in Diffusion Models"), for text-to-image models.

Classifier-free guidance towards the prompt, minus a guidance term towards a safety concept
(a text prompt such as "hate, violence, nudity, ...") applied only where the prompt's
estimate comes close to the concept's. The concept is a third branch of the same batched
forward pass, declared through ``text_branches`` (see docs/plugins.md, register_guidance).

Options and presets follow diffusers' ``StableDiffusionPipelineSafe`` and ``SafetyConfig``,
so the same scheduler, seeds, prompt and settings give the same images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import toolkit
from plugins.guidance import CFG
from plugins.momentum import WarmedMomentum
from plugins.stacking import Stacked, base_options, make_base
from toolkit import OptionError, lazy_import

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")

#: the paper's inappropriate-content concept (its I2P categories), as diffusers' default
DEFAULT_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, "
    "sexual, nudity, bodily fluids, blood, obscene gestures, illegal activity, drug use, "
    "theft, vandalism, weapons, child abuse, brutality, cruelty"
)

#: the paper's hyper-parameter sets (its table 2; diffusers' ``SafetyConfig``)
PRESETS: dict[str, dict[str, float]] = {
    "weak": {"guidance_scale": 20, "warmup_steps": 15, "threshold": 0.0,
             "momentum_scale": 0.0, "momentum_beta": 0.0},
    "medium": {"guidance_scale": 1000, "warmup_steps": 10, "threshold": 0.01,
               "momentum_scale": 0.3, "momentum_beta": 0.4},
    "strong": {"guidance_scale": 2000, "warmup_steps": 7, "threshold": 0.025,
               "momentum_scale": 0.5, "momentum_beta": 0.7},
    "max": {"guidance_scale": 5000, "warmup_steps": 0, "threshold": 1.0,
            "momentum_scale": 0.5, "momentum_beta": 0.7},
}  # fmt: skip
SAFETY = "safety"


class SafeLatentDiffusion(Stacked, CFG):
    """Safe Latent Diffusion: ``cfg`` at `scale`, steered away from `concept`.

    `preset` picks the paper's values for `guidance_scale` (the safety scale), `warmup_steps`
    (steps before the safety term is applied), `threshold`, `momentum_scale` and
    `momentum_beta`; each may be overridden. Without a preset all five must be given. As in
    diffusers, a `guidance_scale` of at most 1 turns the safety term off (plain ``cfg``, and
    the concept's forward pass is skipped).

    The method keeps state across the steps of one sampling run (the momentum, and the step
    count the warmup is measured in, which is the number of calls since the run began). A run
    begins with `start_batch` (the toolkit calls it before each batch) and, for callers that
    do not, at the first call and whenever sigma increases or the batch shape changes:
    samplers walk sigma downwards, so a new batch starting from the largest sigma resets it.
    For a sampler with several network evaluations per step the warmup counts evaluations.

    The guidance the safety term goes on top of is `base` (default ``cfg``; any guider:
    ``apg``, ``pag``, ...), with its options as ``base.KEY=VALUE`` and `scale` as its scale
    unless ``base.scale`` is given (`plugins.stacking`); `scale` also weighs the safety term,
    as in the paper.
    """

    name = "sld"
    branches = ("cond", "uncond", SAFETY)

    def __init__(
        self,
        preset: Literal["weak", "medium", "strong", "max"] | None = "medium",
        scale: float = 7.5,
        guidance_scale: float | None = None,
        warmup_steps: int | None = None,
        threshold: float | None = None,
        momentum_scale: float | None = None,
        momentum_beta: float | None = None,
        concept: str = DEFAULT_CONCEPT,
        base: str = "cfg",
        **base_settings: Any,
    ) -> None:
        given = {"guidance_scale": guidance_scale, "warmup_steps": warmup_steps,
                 "threshold": threshold, "momentum_scale": momentum_scale,
                 "momentum_beta": momentum_beta}  # fmt: skip
        values = dict(PRESETS[preset]) if preset is not None else {}
        values.update({k: v for k, v in given.items() if v is not None})
        missing = [k for k in given if k not in values]
        if missing:
            raise OptionError(f"sld: without a preset, give {', '.join(missing)}")
        super().__init__(scale)
        if not all(math.isfinite(float(v)) for v in values.values()):
            raise OptionError("sld: the safety options must be finite numbers")
        if values["guidance_scale"] < 0:
            raise OptionError("sld: guidance_scale must be >= 0")
        if values["warmup_steps"] < 0 or int(values["warmup_steps"]) != values["warmup_steps"]:
            raise OptionError("sld: warmup_steps must be a whole number >= 0")
        if not 0 <= values["momentum_beta"] <= 1:
            raise OptionError("sld: momentum_beta must be in [0, 1]")
        if not concept.strip():
            raise OptionError("sld: concept must be a non-empty text")
        self.guidance_scale = float(values["guidance_scale"])
        self.warmup_steps = int(values["warmup_steps"])
        self.threshold = float(values["threshold"])
        self.momentum_scale = float(values["momentum_scale"])
        self.momentum_beta = float(values["momentum_beta"])
        self.concept = concept
        self.text_branches = {SAFETY: concept}
        self.base = make_base(self.name, base, self.scale, base_options(self.name, base_settings))
        if "uncond" not in self.base.branches:
            raise OptionError(f"sld: base {base!r} has no unconditional branch to guide from")
        self.branches = self.stack_branches(("uncond", SAFETY))
        self._momentum = WarmedMomentum(self.momentum_scale, self.momentum_beta,
                                        self.warmup_steps)  # fmt: skip
        self._last_sigma = math.inf

    @property
    def enabled(self) -> bool:
        # diffusers' StableDiffusionPipelineSafe switches SLD off at sld_guidance_scale <= 1
        return self.guidance_scale > 1

    def active(self, sigma: float) -> tuple[str, ...]:
        own = ("uncond", SAFETY) if self.enabled else ()
        return tuple(dict.fromkeys([*self.base_active(sigma), *own]))

    def start_batch(self, conditions: Sequence[Mapping[str, str]]) -> None:
        """A new batch: momentum and warmup start afresh (called by `toolkit.generate`)."""
        self.start_base(conditions)
        self._momentum.reset()

    def __call__(self, preds: Mapping[str, torch.Tensor], sigma: float) -> torch.Tensor:
        cond, uncond = preds["cond"], preds["uncond"]
        guided = self.base_estimate(preds, sigma)
        if SAFETY not in preds or sigma <= 0:
            return guided
        if sigma > self._last_sigma:  # a new run, for callers without start_batch
            self._momentum.reset()
        self._last_sigma = sigma
        if math.isinf(sigma):
            # a rectified-flow model's first level (t = 1): every branch's epsilon is the
            # noise itself, so the epsilon differences vanish, the weight of eq. 6 with them,
            # and the term's limit is 0; the step still counts towards the warmup
            self._momentum(torch.zeros_like(cond))
            return guided
        # The paper's rules act element-wise on epsilons, so the affine shortcut of combining
        # clean-image estimates does not carry over. Only differences of epsilons enter them,
        # though, and at fixed x and sigma eps_a - eps_b = (x0_b - x0_a) / sigma: no x needed.
        text_minus_concept = (preds[SAFETY] - cond) / sigma
        concept_minus_uncond = (uncond - preds[SAFETY]) / sigma
        # eq. 6: full weight where the prompt is close to the concept, none past the threshold
        weight = (text_minus_concept.abs() * self.guidance_scale).clamp(max=1.0)
        weight = torch.where(text_minus_concept >= self.threshold, 0.0, weight)
        # eq. 4 and 7, then the momentum update of eq. 8 (which runs during warmup too)
        push = self._momentum(concept_minus_uncond * weight)
        if push is None:
            return guided
        # eq. 3 subtracts `push` from the epsilon guidance; x0 = x - sigma * eps turns that
        # into adding scale * sigma * push to the clean-image estimate
        return guided + (self.scale * sigma) * push


@toolkit.hookimpl
def register_guidance(register: toolkit.Register) -> None:
    register(SafeLatentDiffusion)
