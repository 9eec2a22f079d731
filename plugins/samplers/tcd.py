"""``tcd``: trajectory consistency distillation's strategic stochastic sampling (Zheng et
al., "Trajectory Consistency Distillation", 2024, arXiv:2402.19159), as
diffusers' ``TCDScheduler.step`` computes it, in sigma space.

At timestep ``t`` the model's clean estimate ``x0`` (what our denoiser returns; TCD applies
no consistency boundary condition and no clipping) and its noise ``eps = (x - x0) / sigma``
are taken by a DDIM step down to the intermediate timestep ``s = floor((1 - gamma) t')``
below the next one ``t'``, then fresh noise carries the sample forward to ``t'``:
``x_t' = sqrt(a' / a_s) x_s + sqrt(1 - a' / a_s) z``. Divided by ``sqrt(a')`` that is the
ancestral step ``x' = x0 + sigma_s eps + sqrt(sigma'^2 - sigma_s^2) z``. ``gamma = 0`` is
DDIM; ``gamma = 1`` jumps to the first training level and re-noises as ``lcm`` does.
diffusers calls `gamma` ``eta`` (``TCDScheduler.step``'s default, 0.3, is ours).

``t'`` is the timestep of the next sigma on the model's training levels (rounded when it is
one, as on the ``lcm`` schedule, which gives ``TCDScheduler``'s timesteps), ``s`` a training
timestep: the sampler needs a discrete-time VP model. Where diffusers' last step goes to the
first training level (timestep 0, sigma about 0.03 on SD), ours lands on the estimate at
sigma 0, as every sampler here does; the fresh noise comes from the run's
``noise(sigma, sigma_next)``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from plugins.samplers.updates import discrete_vp_levels, report, sigma_list
from toolkit import OptionError

if TYPE_CHECKING:
    import torch

    from toolkit import Denoiser, NoiseSource, StepCallback


def intermediate_timestep(t_next: float, gamma: float) -> int:
    """``floor((1 - gamma) t')``, computed as ``TCDScheduler`` does for an integer `t_next`
    (float32 times an int64 timestep), in double precision otherwise."""
    import torch

    if t_next == round(t_next):
        return int(torch.floor((1 - gamma) * torch.tensor(round(t_next))))
    return math.floor((1 - gamma) * t_next)


class TCD:
    """Strategic stochastic sampling (see the module docstring); `gamma` in [0, 1]."""

    name = "tcd"

    def __init__(self, gamma: float = 0.3) -> None:
        if not 0 <= gamma <= 1:
            raise OptionError("tcd: gamma must be in [0, 1]")
        self.gamma = gamma

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
        levels = discrete_vp_levels(
            denoise, self.name, "it steps through the model's training timesteps"
        )
        train = levels.sigmas.tolist()
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoise(x, sigma)
            if sigma_next == 0:
                x = denoised
            else:
                t_next = float(levels.sigma_to_t(torch.tensor(sigma_next, dtype=torch.float64)))
                if abs(t_next - round(t_next)) < 1e-6:
                    t_next = float(round(t_next))  # a training timestep, up to rounding
                sigma_s = min(train[intermediate_timestep(t_next, self.gamma)], sigma_next)
                x = denoised + (x - denoised) * (sigma_s / sigma)
                sigma_up = math.sqrt(sigma_next**2 - sigma_s**2)
                if sigma_up > 0:
                    x = x + noise(sigma, sigma_next) * sigma_up
            report(callback, i, x, sigma, sigma, denoised)
        return x
