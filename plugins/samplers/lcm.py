"""``lcm``: multistep latent consistency sampling (Luo et al. 2023), as diffusers'
``LCMScheduler.step`` computes it, in sigma space.

A consistency model maps a noisy sample straight to a clean one. At timestep ``t`` (VP
sample ``x_t = x / sqrt(sigma^2 + 1)``) the scheduler takes the network's clean estimate
``x0`` (what our denoiser returns; clipped or thresholded as the scheduler config says) and
applies the consistency boundary condition,

    ``denoised = c_out(t) x0 + c_skip(t) x_t``, with ``c_skip = s_d^2 / (u^2 + s_d^2)`` and
    ``c_out = u / sqrt(u^2 + s_d^2)``, ``u = t * timestep_scaling``, ``s_d = 0.5``;

then it re-noises ``denoised`` with fresh noise to the next timestep:
``x_t' = sqrt(a') denoised + sqrt(1 - a') z``, which in sigma space (divided by
``sqrt(a')``) is ``x' = denoised + sigma' z``. The last step returns ``denoised``. The
fresh noise comes from the run's ``noise(sigma, sigma_next)``, so each sample's randomness
is its own (docs/contracts.md, "Reproducibility"), and equals ``LCMScheduler`` fed the same
draws. Its schedule is ``lcm`` (``LCMScheduler``'s timesteps); ``t`` is the timestep of
``sigma`` on the model's training levels (`NoiseLevels.sigma_to_t`), so the sampler needs a
discrete-time VP model.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from plugins.samplers.ddim import _Clipping
from plugins.samplers.updates import discrete_vp_levels, report, sigma_list
from toolkit import OptionError

if TYPE_CHECKING:
    import torch

    from toolkit import Denoiser, NoiseSource, StepCallback

#: LCMScheduler's defaults: the boundary condition's timestep scaling and data deviation
TIMESTEP_SCALING = 10.0
SIGMA_DATA = 0.5


def boundary_scalings(t: float, timestep_scaling: float = TIMESTEP_SCALING
                      ) -> tuple[float, float]:  # fmt: skip
    """``(c_skip, c_out)`` at timestep `t`, as ``LCMScheduler.
    get_scalings_for_boundary_condition_discrete``."""
    u = t * timestep_scaling
    return SIGMA_DATA**2 / (u**2 + SIGMA_DATA**2), u / math.sqrt(u**2 + SIGMA_DATA**2)


class LCM(_Clipping):
    """Multistep latent consistency sampling (see the module docstring). `timestep_scaling`
    and the clipping options default to None: as the model's scheduler config says."""

    name = "lcm"

    def __init__(
        self,
        timestep_scaling: float | None = None,
        clip_sample: bool | None = None,
        clip_sample_range: float | None = None,
        thresholding: bool | None = None,
        dynamic_thresholding_ratio: float | None = None,
        sample_max_value: float | None = None,
    ) -> None:
        if timestep_scaling is not None and not timestep_scaling > 0:
            raise OptionError("lcm: timestep_scaling must be positive")
        self.timestep_scaling = timestep_scaling
        _Clipping.__init__(self, clip_sample, clip_sample_range, thresholding,
                           dynamic_thresholding_ratio, sample_max_value)  # fmt: skip

    def scaling(self, denoise: Any) -> float:
        if self.timestep_scaling is not None:
            return self.timestep_scaling
        config = getattr(denoise, "scheduler_config", None) or {}
        return float(config.get("timestep_scaling", TIMESTEP_SCALING))

    def __call__(
        self,
        denoise: Denoiser,
        x: torch.Tensor,
        sigmas: Any,
        *,
        noise: NoiseSource,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        import torch

        sigmas = sigma_list(sigmas)
        levels = discrete_vp_levels(denoise, self.name, "its boundary condition is taken at "
                                    "the model's training timesteps")  # fmt: skip
        scaling, clip = self.scaling(denoise), self.clipping(denoise)
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            x0 = clip(denoise(x, sigma))
            t = float(levels.sigma_to_t(torch.tensor(sigma, dtype=torch.float64)))
            c_skip, c_out = boundary_scalings(t, scaling)
            denoised = c_out * x0 + c_skip / math.sqrt(sigma**2 + 1) * x
            x = denoised if sigma_next == 0 else denoised + noise(sigma, sigma_next) * sigma_next
            report(callback, i, x, sigma, sigma, denoised)
        return x
