"""The denoiser a sampler sees: a model's sigma-space denoiser with guidance applied.

`GuidedDenoiser` evaluates every branch a guidance method asks for at this noise level in
ONE batched forward pass (the branches' inputs come from the batch's `Conditioning`, built
by the model's family), then lets the guidance combine the estimates. It also exposes the
model's `noise_levels` and `scheduler_config`, which some samplers read (the ``diffusers``
adapter, ``ddim``'s clipping), and a learned-variance model's `variance` for the last call
(``ddpm`` reads it; `toolkit.models.family.Model.variance`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from toolkit.errors import DtkError
from toolkit.lazy import lazy_import
from toolkit.models.family import COND, UNCOND
from toolkit.registry.protocols import optional

if TYPE_CHECKING:
    import torch

    from toolkit.models.family import Conditioning, Model
else:
    torch = lazy_import("torch")


def sigma_scalar(sigma: Any) -> float:
    """One float for a step's sigma (samplers pass one sigma for the whole batch)."""
    if hasattr(sigma, "ndim") and sigma.ndim > 0:
        return float(sigma.reshape(-1)[0])
    return float(sigma)


def active_branches(guidance: Any, sigma: float) -> tuple[str, ...]:
    """The branches `guidance` needs at `sigma`."""
    active = optional("guidance", guidance, "active")
    return tuple(active(sigma)) if active is not None else tuple(guidance.branches)


class GuidedDenoiser:
    """``D(x, sigma)`` with `guidance` applied over `conditioning`'s branches."""

    def __init__(self, model: Model, guidance: Any, conditioning: Conditioning) -> None:
        self.model = model
        self.guidance = guidance
        self.conditioning = conditioning
        self.noise_levels = model.noise_levels
        self.scheduler_config = model.scheduler_config
        self.forwards = 0  # number of network calls, for tests and benchmarks
        self.variance: torch.Tensor | None = None  # see `Model.variance`

    def _inputs_for(self, branch: str, batch: int, device: torch.device) -> dict[str, Any]:
        try:
            return self.conditioning.inputs(branch, batch, device)
        except KeyError:
            raise DtkError(
                f"guidance {self.guidance.name!r} asked for unknown branch {branch!r}"
            ) from None

    def __call__(self, x: torch.Tensor, sigma: Any) -> torch.Tensor:
        return self.with_unconditional(x, sigma)[0]

    def with_unconditional(self, x: torch.Tensor, sigma: Any
                           ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The guided estimate and the ``uncond`` branch's from the same forward pass (the
        guided one again where no ``uncond`` branch ran): what CFG++ samplers ask for,
        through `toolkit.with_unconditional`."""
        branches = active_branches(self.guidance, sigma_scalar(sigma))
        batch = x.shape[0]
        xs = x if len(branches) == 1 else torch.cat([x] * len(branches))
        per_branch = [self._inputs_for(b, batch, x.device) for b in branches]
        inputs = {k: torch.cat([p[k] for p in per_branch]) for k in per_branch[0]}
        if hasattr(sigma, "ndim") and sigma.ndim > 0:
            sigma = torch.cat([sigma] * len(branches))
        self.forwards += 1
        denoised = self.model.denoise(xs, sigma, **inputs).split(batch)
        preds: Mapping[str, torch.Tensor] = dict(zip(branches, denoised))
        # a learned-variance model's variance for this call: the cond branch's (`Model.variance`)
        variance = getattr(self.model, "variance", None)
        if variance is not None:
            variance = variance.split(batch)[branches.index(COND) if COND in branches else 0]
        self.variance = variance
        guided = self.guidance(preds, sigma_scalar(sigma))
        return guided, preds.get(UNCOND, guided)
