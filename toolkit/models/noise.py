"""`NoiseLevels`: the noise levels a model was trained on, in k-diffusion's sigma space.

Conventions (Karras et al. 2022; k-diffusion): ``x = x0 + sigma * eps``. A DDPM-trained (VP)
model with cumulative alphas ``a_t`` has ``sigma_t = sqrt((1 - a_t) / a_t)``; it sees the
input ``x / sqrt(sigma^2 + 1)`` and the timestep ``t`` found by interpolating ``log sigma``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from toolkit.errors import DtkError
from toolkit.lazy import lazy_import

if TYPE_CHECKING:
    import numpy as np
    import torch
else:
    np = lazy_import("numpy")
    torch = lazy_import("torch")

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _conversion_dtype(device: torch.device) -> torch.dtype:
    # Timestep interpolation wants float64; MPS has none.
    return torch.float32 if device.type == "mps" else torch.float64


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseLevels:
    """The training noise levels of a model.

    `sigmas` holds the discrete training sigmas ordered by timestep (ascending), for models
    trained on discrete timesteps; it is ``None`` for continuous-time (EDM/VE) models, which
    are described by `sigma_min` and `sigma_max` alone.
    """

    sigma_min: float
    sigma_max: float
    sigmas: torch.Tensor | None = None
    is_flow: ClassVar[bool] = False

    # -- constructors --------------------------------------------------------------------

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Any) -> NoiseLevels:
        """Noise levels of a VP (DDPM-style) model from its cumulative alphas."""
        ac = torch.as_tensor(alphas_cumprod).detach().cpu()
        if ac.ndim != 1 or len(ac) < 2:
            raise DtkError("alphas_cumprod must be a 1-D sequence of at least 2 values")
        if not bool(((ac > 0) & (ac < 1)).all()):
            raise DtkError(
                "alphas_cumprod must lie strictly between 0 and 1 (zero-terminal-SNR "
                "schedules are not supported)"
            )
        # float32 first, as diffusers computes them, so our sigmas match its to the bit.
        sigmas = ((1 - ac.float()) / ac.float()) ** 0.5
        sigmas = sigmas.double()
        return cls(float(sigmas.min()), float(sigmas.max()), sigmas)

    @classmethod
    def from_betas(cls, betas: Any) -> NoiseLevels:
        betas = torch.as_tensor(betas, dtype=torch.float32)
        return cls.from_alphas_cumprod(torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any] | str | pathlib.Path) -> NoiseLevels:
        """Noise levels from a diffusers scheduler config (a dict or a JSON file's path).

        Reads ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``
        (linear, scaled_linear, squaredcos_cap_v2) and ``trained_betas``, with diffusers'
        defaults for missing keys.
        """
        if not isinstance(config, Mapping):
            path = pathlib.Path(config)
            try:
                config = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise DtkError(f"cannot read scheduler config {path}: {exc}") from None
        if config.get("rescale_betas_zero_snr"):
            raise DtkError("scheduler configs with rescale_betas_zero_snr are not supported")
        if config.get("trained_betas") is not None:
            return cls.from_betas(config["trained_betas"])
        n = int(config.get("num_train_timesteps", 1000))
        start = float(config.get("beta_start", 0.0001))
        end = float(config.get("beta_end", 0.02))
        schedule = config.get("beta_schedule", "linear")
        if schedule == "linear":
            betas = torch.linspace(start, end, n, dtype=torch.float32)
        elif schedule == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
        elif schedule == "squaredcos_cap_v2":
            betas = _cosine_betas(n)
        else:
            raise DtkError(
                f"unsupported beta_schedule {schedule!r}; supported: {', '.join(BETA_SCHEDULES)}"
            )
        return cls.from_betas(betas)

    @classmethod
    def continuous(cls, sigma_min: float, sigma_max: float) -> NoiseLevels:
        """Noise levels of a continuous-time model trained on ``[sigma_min, sigma_max]``."""
        if not 0 < sigma_min < sigma_max:
            raise DtkError("need 0 < sigma_min < sigma_max")
        return cls(float(sigma_min), float(sigma_max), None)

    # -- properties ----------------------------------------------------------------------

    @property
    def is_discrete(self) -> bool:
        return self.sigmas is not None

    @property
    def num_timesteps(self) -> int:
        if self.sigmas is None:
            raise DtkError("a continuous-time model has no discrete timesteps")
        return len(self.sigmas)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        if self.sigmas is None:
            raise DtkError("a continuous-time model has no alphas_cumprod")
        return 1 / (1 + self.sigmas**2)

    # -- conversions ---------------------------------------------------------------------

    def sigma_to_t(self, sigma: Any) -> torch.Tensor:
        """The (fractional) timestep of each `sigma`, interpolating linearly in log sigma.

        For continuous-time models t is ``log(sigma) / 4`` (the EDM convention).
        """
        sigma = torch.as_tensor(sigma)
        dtype = _conversion_dtype(sigma.device)
        log_sigma = sigma.to(dtype).clamp(min=1e-10).log()
        if self.sigmas is None:
            return (log_sigma / 4).to(sigma.dtype if sigma.is_floating_point() else dtype)
        log_sigmas = self.sigmas.to(sigma.device, dtype).log()
        flat = log_sigma.reshape(-1)
        dists = flat[None, :] - log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(log_sigmas) - 2)
        high = low + 1
        lo, hi = log_sigmas[low], log_sigmas[high]
        w = ((lo - flat) / (lo - hi)).clamp(0, 1)
        t = (1 - w) * low + w * high
        out_dtype = sigma.dtype if sigma.is_floating_point() else dtype
        return t.reshape(sigma.shape).to(out_dtype)

    def t_to_sigma(self, t: Any) -> torch.Tensor:
        """The sigma at (fractional) timestep `t`, interpolating linearly in log sigma."""
        t = torch.as_tensor(t)
        dtype = _conversion_dtype(t.device)
        if self.sigmas is None:
            return (t.to(dtype) * 4).exp().to(t.dtype if t.is_floating_point() else dtype)
        log_sigmas = self.sigmas.to(t.device, dtype).log()
        tt = t.to(dtype).clamp(0, len(log_sigmas) - 1)
        low = tt.floor().long()
        high = tt.ceil().long()
        w = tt - low
        sigma = ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
        return sigma.to(t.dtype if t.is_floating_point() else dtype)

    def __repr__(self) -> str:
        kind = f"{len(self.sigmas)} discrete" if self.sigmas is not None else "continuous"
        bounds = f"sigma_min={self.sigma_min:.4g}, sigma_max={self.sigma_max:.4g}"
        return f"NoiseLevels({kind}, {bounds})"


def _cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule, as diffusers' ``squaredcos_cap_v2``."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class FlowLevels:
    """The noise levels of a rectified-flow model (SD3, Flux): ``x_t = (1 - t) x0 + t eps``.

    In sigma space that is the same ODE as ``x_t / (1 - t) = x0 + sigma eps`` with
    ``sigma = t / (1 - t)``, so every sigma-space sampler runs on it; ``t = 1`` (pure noise)
    is ``sigma = inf``. The network is trained on ``t`` in ``(0, 1]`` and takes the timestep
    ``t * num_train_timesteps``. Sampling times are shifted towards noise, as diffusers'
    ``FlowMatchEulerDiscreteScheduler`` shifts them: statically, ``t' = shift t / (1 + (shift
    - 1) t)`` (SD3), or by resolution (Flux's dynamic shifting), ``t' = e^mu / (e^mu +
    1 / t - 1)`` with `mu` computed from the image's sequence length.

    `spacing` is how the model's pipeline spaces its sampling times, which the ``flow``
    schedule follows unless told otherwise: ``euler``, the scheduler's own (SD3), or
    ``uniform``, ``t = 1, (N - 1) / N, ..., 1 / N`` (FluxPipeline hands its scheduler
    these), both then shifted.
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    mu: float | None = None
    spacing: str = "euler"
    is_flow: ClassVar[bool] = True
    sigmas: ClassVar[None] = None  # no discrete VP training sigmas

    def shifted(self, t: Any) -> Any:
        """Sampling times `t` (array or float, in (0, 1]) shifted as the model was trained."""
        if self.mu is not None:
            return math.exp(self.mu) / (math.exp(self.mu) + (1 / t - 1))
        return self.shift * t / (1 + (self.shift - 1) * t)

    @property
    def t_min(self) -> float:
        """The smallest training time as diffusers' ``sigma_min`` (float32): statically
        shifted already when the shift is static, unshifted when it is dynamic."""
        t = np.float32(1 / self.num_train_timesteps)
        return float(t if self.mu is not None else np.float32(self.shifted(t)))

    @property
    def sigma_min(self) -> float:
        return self.t_min / (1 - self.t_min)

    @property
    def sigma_max(self) -> float:
        return math.inf

    @property
    def is_discrete(self) -> bool:
        return False

    def sigma_to_t(self, sigma: Any) -> torch.Tensor:
        """The network's timestep ``t * num_train_timesteps`` of each `sigma` (inf -> t = 1)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        t = torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))
        return (t * self.num_train_timesteps).float()

    def t_to_sigma(self, timestep: Any) -> torch.Tensor:
        t = torch.as_tensor(timestep, dtype=torch.float64) / self.num_train_timesteps
        return torch.where(t >= 1, torch.full_like(t, math.inf), t / (1 - t))

    def __repr__(self) -> str:
        how = f"mu={self.mu:.4g}" if self.mu is not None else f"shift={self.shift:g}"
        if self.spacing != "euler":
            how += f", spacing {self.spacing}"
        return f"FlowLevels({self.num_train_timesteps} timesteps, {how})"
