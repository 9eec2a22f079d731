"""The improved pseudo-numerical methods (Zhang & Chen 2023, "Fast Sampling of Diffusion
Models with Exponential Integrator", and the zju-pi ``diff-sampler`` solvers that ComfyUI
ships as ``ipndm`` and ``ipndm_v``): Adams-Bashforth steps in sigma on the probability-flow
ODE's derivative ``d = (x - x0) / sigma``, up to fourth order, the first steps at the order
their history allows, the step to sigma 0 landing on the clean-image estimate.

``ipndm`` uses the coefficients of equal steps whatever the schedule; ``ipndm_v`` those of
the actual, variable steps (for order 2, Adams-Bashforth on a non-uniform grid)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from plugins.samplers.updates import report, sigma_list, to_d
from toolkit import OptionError

if TYPE_CHECKING:
    import torch

    from toolkit import Denoiser, NoiseSource, StepCallback

#: Adams-Bashforth on equal steps: the weights of d_i, d_{i-1}, ... at each order
FIXED = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
         4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}  # fmt: skip


def variable_weights(sigmas: Sequence[float], i: int, order: int) -> tuple[float, ...]:
    """The weights of d_i, d_{i-1}, ... for the step from ``sigmas[i]`` on the actual grid
    (the diff-sampler ``ipndm_v`` coefficients), with ``h_k`` the steps so far."""
    h = sigmas[i + 1] - sigmas[i]
    h1 = sigmas[i] - sigmas[i - 1] if order > 1 else 0.0
    if order == 1:
        return (1.0,)
    base = ((2 + h / h1) / 2, -(h / h1) / 2)
    if order == 2:
        return base
    h2 = sigmas[i - 1] - sigmas[i - 2]
    temp1 = (1 - h / (3 * (h + h1)) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2
    if order == 3:
        return (base[0] + temp1, base[1] - (1 + h1 / h2) * temp1, temp1 * h1 / h2)
    h3 = sigmas[i - 2] - sigmas[i - 3]
    ratio = h1 * (h1 + h2) / (h2 * (h2 + h3))
    temp2 = (((1 - h / (3 * (h + h1))) / 2 + (1 - h / (2 * (h + h1))) * h / (6 * (h + h1 + h2)))
             * (h * (h + h1) * (h + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3)))  # fmt: skip
    return (base[0] + temp1 + temp2,
            base[1] - (1 + h1 / h2) * temp1 - (1 + h1 / h2 + ratio) * temp2,
            temp1 * h1 / h2 + (h1 / h2 + ratio * (1 + h2 / h3)) * temp2,
            -temp2 * ratio * h1 / h2)  # fmt: skip


class IPNDM:
    """iPNDM: Adams-Bashforth in sigma with the equal-step coefficients, up to `order`."""

    name = "ipndm"
    variable = False

    def __init__(self, order: int = 4) -> None:
        if not 1 <= order <= 4:
            raise OptionError(f"{self.name}: order must be between 1 and 4")
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
        history: list[torch.Tensor] = []  # the derivatives, newest first
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoise(x, sigma)
            d = to_d(x, sigma, denoised)
            history = [d, *history][: self.order]
            if sigma_next == 0:
                x = denoised
            else:
                order = len(history)
                weights = variable_weights(sigmas, i, order) if self.variable else FIXED[order]
                x = x + (sigma_next - sigma) * sum(w * h for w, h in zip(weights, history))
            report(callback, i, x, sigma, sigma, denoised)
        return x


class IPNDMV(IPNDM):
    """iPNDM-v: as ``ipndm`` with the coefficients of the schedule's actual steps."""

    name = "ipndm_v"
    variable = True
