"""The predictor-corrector sampler of Song et al. 2021 (score SDE, variance exploding), as
diffusers' ``ScoreSdeVePipeline`` runs it with ``ScoreSdeVeScheduler``, in sigma space.

With the score ``s = (D(x, sigma) - x) / sigma^2`` (Tweedie; for a VE model it is what the
network returns), each step from ``sigma`` to ``sigma'`` is

* ``correct_steps`` Langevin corrector steps at ``sigma``: ``x <- x + e s + sqrt(2 e) z``
  with the step size ``e = 2 (snr |z| / |s|)^2`` (Song et al.'s algorithm 5);
* then the reverse-diffusion predictor: ``x' = x + (sigma^2 - sigma'^2) s +
  sqrt(sigma^2 - sigma'^2) z``; to ``sigma' = 0`` it adds no noise, and lands on
  ``x + sigma^2 s = D(x, sigma)``, the pipeline's final ``prev_sample_mean``.

diffusers averages ``|z|`` and ``|s|`` over the batch, so a sample's step size, and the
sample, depend on the batch it is in; here each sample has its own (the per-sample contract,
docs/contracts.md "Reproducibility"). For one sample the two agree. ``ScoreSdeVePipeline``
with ``N`` steps runs through ``N`` log-spaced noise levels from ``sigma_max`` to
``sigma_min``: our ``exponential`` schedule with ``N`` steps (its network sees
``sigma_min (sigma_max / sigma_min)^t`` with ``t = linspace(1, sampling_eps, N)``, up to
``sampling_eps`` = 1e-5 away in the exponent).

`snr` and `correct_steps` default to the model's ``ScoreSdeVeScheduler`` config (diffusers'
defaults, 0.15 and 1, for any other model). Each step costs ``1 + correct_steps`` network
calls.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from plugins.samplers.updates import report, sigma_list
from toolkit import OptionError

if TYPE_CHECKING:
    import torch

    from toolkit import Denoiser, NoiseSource, StepCallback

#: ``ScoreSdeVeScheduler``'s defaults
SNR, CORRECT_STEPS = 0.15, 1


class ScoreSdeVe:
    """Reverse-diffusion predictor + Langevin corrector (Song et al. 2021)."""

    name = "score_sde_ve"

    def __init__(self, snr: float | None = None, correct_steps: int | None = None) -> None:
        if snr is not None and not snr > 0:
            raise OptionError("snr must be positive")
        if correct_steps is not None and correct_steps < 0:
            raise OptionError("correct_steps must be 0 or more")
        self.snr, self.correct_steps = snr, correct_steps

    def options(self, denoise: Any) -> tuple[float, int]:
        """(snr, correct_steps): those given, the rest from the model's VE scheduler config."""
        config = getattr(denoise, "scheduler_config", None) or {}
        if config.get("_class_name") != "ScoreSdeVeScheduler":
            config = {}
        snr = self.snr if self.snr is not None else float(config.get("snr", SNR))
        steps = self.correct_steps
        if steps is None:
            steps = int(config.get("correct_steps", CORRECT_STEPS))
        return snr, steps

    def __call__(
        self,
        denoise: Denoiser,
        x: torch.Tensor,
        sigmas: Any,
        *,
        noise: NoiseSource,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        sigmas = sigma_list(sigmas)
        snr, correct_steps = self.options(denoise)
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            for _ in range(correct_steps):
                score = (denoise(x, sigma) - x) / sigma**2
                z = noise(sigma, sigma)
                step = 2 * (snr * _norms(z) / _norms(score)) ** 2
                x = x + step * score + (2 * step).sqrt() * z
            denoised = denoise(x, sigma)
            score = (denoised - x) / sigma**2
            x = x + (sigma**2 - sigma_next**2) * score
            if sigma_next > 0:
                x = x + math.sqrt(sigma**2 - sigma_next**2) * noise(sigma, sigma_next)
            report(callback, i, x, sigma, sigma, denoised)
        return x


def _norms(v: torch.Tensor) -> torch.Tensor:
    """Each sample's Euclidean norm, shaped to broadcast against `v`."""
    return v.reshape(v.shape[0], -1).norm(dim=-1).view(-1, *([1] * (v.ndim - 1)))
