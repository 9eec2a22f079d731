"""Built-in guidance methods.

A guidance class names the conditionings it needs in ``branches`` (``"cond"``: the samples'
own conditions; ``"uncond"``: every attribute left unspecified). The toolkit evaluates them
in one batched forward pass and calls ``guidance(preds, sigma)`` with the clean-image
estimates by branch; ``active(sigma)``, if defined, may ask for fewer branches at some noise
levels (saving the forward pass for them). Combining clean-image estimates is the same as
combining epsilons (``x0 = x - sigma * eps`` is affine in eps at fixed x and sigma).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import toolkit
from toolkit import OptionError

if TYPE_CHECKING:
    import torch


def check_finite(name: str, **values: float) -> None:
    """Refuse, in one line naming guidance `name` and the option, a value that is not a
    finite number."""
    for option, value in values.items():
        if not math.isfinite(value):
            raise OptionError(f"{name}: {option} must be a finite number")


class NoGuidance:
    """The model's prediction for the requested condition, unchanged."""

    name = "none"
    branches = ("cond",)

    def __call__(self, preds: Mapping[str, torch.Tensor], sigma: float) -> torch.Tensor:
        return preds["cond"]


class CFG:
    """Classifier-free guidance (Ho & Salimans 2022): ``u + scale * (c - u)``."""

    name = "cfg"
    branches = ("cond", "uncond")

    def __init__(self, scale: float = 2.0) -> None:
        check_finite(self.name, scale=scale)
        self.scale = scale

    def __call__(self, preds: Mapping[str, torch.Tensor], sigma: float) -> torch.Tensor:
        uncond = preds["uncond"]
        return uncond + self.scale * (preds["cond"] - uncond)


class CFGRescale(CFG):
    """CFG with the guided estimate's per-sample std rescaled towards the conditional one's
    (Lin et al. 2023, sec. 3.4), mixed by `phi`, to counter over-exposure at high scales."""

    name = "cfg_rescale"

    def __init__(self, scale: float = 7.5, phi: float = 0.7) -> None:
        super().__init__(scale)
        if not 0 <= phi <= 1:
            raise OptionError("cfg_rescale: phi must be in [0, 1]")
        self.phi = phi

    def __call__(self, preds: Mapping[str, torch.Tensor], sigma: float) -> torch.Tensor:
        return rescale_cfg(super().__call__(preds, sigma), preds["cond"], self.phi, floor=1e-12)


def rescale_cfg(guided: torch.Tensor, cond: torch.Tensor, phi: float, floor: float = 0.0
                ) -> torch.Tensor:  # fmt: skip
    """The guided prediction's per-sample std moved towards the conditional one's by `phi`
    (Lin et al. 2023, sec. 3.4), as diffusers' ``rescale_noise_cfg``; the guided std is
    kept at least `floor` (diffusers' has none)."""
    dims = tuple(range(1, cond.ndim))
    std_guided = guided.std(dim=dims, keepdim=True)
    if floor > 0:
        std_guided = std_guided.clamp(min=floor)
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / std_guided)
    return phi * rescaled + (1 - phi) * guided


class IntervalCFG(CFG):
    """CFG only for sigma in ``[lo, hi]`` (Kynkäänniemi et al. 2024); elsewhere the
    conditional estimate alone, which also skips the unconditional forward pass."""

    name = "interval"

    def __init__(self, scale: float = 2.0, lo: float = 0.28, hi: float = 5.42) -> None:
        super().__init__(scale)
        if not 0 <= lo <= hi:
            raise OptionError("interval: need 0 <= lo <= hi")
        self.lo, self.hi = lo, hi

    def active(self, sigma: float) -> tuple[str, ...]:
        return self.branches if self.lo <= sigma <= self.hi else ("cond",)

    def __call__(self, preds: Mapping[str, torch.Tensor], sigma: float) -> torch.Tensor:
        if "uncond" not in preds:
            return preds["cond"]
        return super().__call__(preds, sigma)


@toolkit.hookimpl
def register_guidance(register: toolkit.Register) -> None:
    for guidance in (NoGuidance, CFG, CFGRescale, IntervalCFG):
        register(guidance)
