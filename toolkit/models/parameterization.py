"""How a network's input and output relate to k-diffusion's sigma space (Karras et al. 2022,
table 1), one class per parameterization, as ComfyUI's ``model_sampling`` does: the family
knows its parameterization, the samplers never do.

`VP`: a DDPM-trained network on discrete timesteps sees ``c_in x = x / sqrt(sigma^2 + 1)``
at the timestep whose training sigma is ``sigma`` (`NoiseLevels.sigma_to_t`), and its output
``F`` becomes a clean-image estimate by ``x - sigma F`` (epsilon), ``x / (sigma^2 + 1) -
sigma / sqrt(sigma^2 + 1) F`` (v-prediction) or ``F`` itself (sample prediction).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from toolkit.lazy import lazy_import

if TYPE_CHECKING:
    import torch

    from toolkit.models.noise import NoiseLevels
else:
    torch = lazy_import("torch")


def sigma_batch(sigma: Any, batch: int, device: torch.device) -> torch.Tensor:
    """`sigma` (float, 0-d or [B] tensor) as a float32 [B] tensor on `device`."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    if sigma.ndim == 0:
        sigma = sigma.expand(batch)
    return sigma


class VP:
    """Variance-preserving (DDPM) parameterization with epsilon, v or sample prediction."""

    def __init__(self, noise_levels: NoiseLevels, prediction_type: str) -> None:
        self.noise_levels = noise_levels
        self.prediction_type = prediction_type

    def inputs(self, x: torch.Tensor, sigma: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(the network's input, its timestep) for samples `x` at noise level `sigma`."""
        sigma = sigma_batch(sigma, x.shape[0], x.device)
        c_in = 1 / (_expand(sigma, x) ** 2 + 1).sqrt()
        return x * c_in, self.noise_levels.sigma_to_t(sigma)

    def denoised(self, x: torch.Tensor, sigma: Any, out: torch.Tensor) -> torch.Tensor:
        """The clean-image estimate from the network's output `out` (in x's precision)."""
        s = _expand(sigma_batch(sigma, x.shape[0], x.device), x)
        out = out.to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return x / (s**2 + 1) - s * (1 / (s**2 + 1).sqrt()) * out
        return out

    def prior(self, eps: torch.Tensor, sigma: float) -> torch.Tensor:
        """A sample of the model's prior at `sigma` from standard normal `eps`:
        ``x = eps * sqrt(sigma^2 + 1)`` (the VP marginal, rescaled to sigma space)."""
        return eps * math.sqrt(float(sigma) ** 2 + 1)


def _expand(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.view(-1, *([1] * (x.ndim - 1)))


class Flow:
    """Rectified-flow parameterization (SD3, Flux): the network predicts the velocity
    ``v = eps - x0`` of ``x_t = (1 - t) x0 + t eps`` at timestep ``t * N``.

    In sigma space (``sigma = t / (1 - t)``, ``x = x_t / (1 - t)``) the input is
    ``x_t = x / (1 + sigma)`` at ``t = sigma / (1 + sigma)``, and the estimate is
    ``x0 = x_t - t v``. At ``t = 1`` (``sigma = inf``) the state is held as the noise itself,
    ``x / sigma`` in the limit (docs/contracts.md, "Reproducibility"): then ``x_t = x``.
    """

    def __init__(self, noise_levels: Any) -> None:
        self.noise_levels = noise_levels

    def inputs(self, x: torch.Tensor, sigma: Any) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = sigma_batch(sigma, x.shape[0], x.device).double()
        t = torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))
        scale = torch.where(torch.isinf(sigma), torch.ones_like(sigma), 1 / (1 + sigma))
        x_t = x * _expand(scale, x).to(x.dtype)
        return x_t, (t * self.noise_levels.num_train_timesteps).to(torch.float32)

    def denoised(self, x: torch.Tensor, sigma: Any, out: torch.Tensor) -> torch.Tensor:
        x_t, timestep = self.inputs(x, sigma)
        t = _expand(timestep.double() / self.noise_levels.num_train_timesteps, x)
        return x_t - t.to(x.dtype) * out.to(x.dtype)

    def prior(self, eps: torch.Tensor, sigma: float) -> torch.Tensor:
        """Pure noise as the state at `sigma`: ``x_t = eps`` (the noise itself at ``inf``),
        as diffusers starts its flow schedulers whatever their first ``t``."""
        return eps if math.isinf(sigma) else eps * (1 + float(sigma))
