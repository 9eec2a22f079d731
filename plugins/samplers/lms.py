"""Linear multistep (k-diffusion's ``sample_lms``; diffusers' ``LMSDiscreteScheduler``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plugins.samplers.updates import lms_coefficient, report, sigma_list, to_d
from toolkit import OptionError

if TYPE_CHECKING:
    import torch

    from toolkit import Denoiser, NoiseSource, StepCallback


class LMS:
    """Adams-Bashforth in sigma: the last `order` derivatives extrapolated by a polynomial."""

    name = "lms"

    def __init__(self, order: int = 4) -> None:
        if not 1 <= order <= 6:
            raise OptionError("lms: order must be between 1 and 6")
        self.order = order

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
        derivatives: list[torch.Tensor] = []
        for i in range(len(sigmas) - 1):
            denoised = denoise(x, sigmas[i])
            derivatives.append(to_d(x, sigmas[i], denoised))
            if len(derivatives) > self.order:
                derivatives.pop(0)
            order = min(i + 1, self.order)
            for j, d in enumerate(reversed(derivatives)):
                x = x + lms_coefficient(order, sigmas, i, j) * d
            report(callback, i, x, sigmas[i], sigmas[i], denoised)
        return x
