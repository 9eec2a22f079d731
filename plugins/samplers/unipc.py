"""UniPC (Zhao et al. 2023): a unified predictor-corrector on DPM-Solver++'s exponential
integrator, as diffusers' ``UniPCMultistepScheduler`` (data prediction) computes it.

Divided by the VP scale ``alpha``, diffusers' update becomes, in sigma space,
``x' = (sigma'/sigma) x - expm1(-h) m0 - B(h) * sum_k rho_k D_k`` with
``D_k = (m_k - m0) / r_k`` built from earlier estimates ``m_k``; ``B(h)`` is ``-h`` (bh1)
or ``expm1(-h)`` (bh2). After each model call the corrector (UniC) redoes the previous step
with the new estimate included, at no extra model call.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from plugins.samplers.updates import lam, report, sigma_list
from toolkit import OptionError

if TYPE_CHECKING:
    import torch

    from toolkit import Denoiser, NoiseSource, StepCallback


def _coefficients(
    h: float, rks: list[float], order: int, variant: str
) -> tuple[float, list[float], list[float]]:
    """``B(h)``, the powers matrix rows ``R`` and right-hand side ``b`` of UniPC's system."""
    import numpy as np

    hh = -h  # data prediction
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rows, rhs = [], []
    for i in range(1, order + 1):
        rows.append(np.power(rks, i - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return b_h, np.array(rows), np.array(rhs)


class UniPC:
    """UniPC multistep predictor-corrector of order `order` (1 to 3)."""

    name = "unipc"

    def __init__(
        self,
        order: int = 2,
        variant: Literal["bh1", "bh2"] = "bh2",
        lower_order_final: bool = True,
        corrector: bool = True,
    ) -> None:
        if not 1 <= order <= 3:
            raise OptionError("unipc: order must be 1, 2 or 3")
        self.order, self.variant = order, variant
        self.lower_order_final, self.corrector = lower_order_final, corrector

    def _update(
        self,
        x: torch.Tensor,
        sigma: float,
        sigma_next: float,
        history: list[tuple[float, torch.Tensor]],
        order: int,
        model_next: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predictor (``model_next`` None) or corrector step from `sigma` to `sigma_next`.

        `history` lists ``(sigma_k, m_k)`` with the estimate at `sigma` last.
        """
        import numpy as np

        sigma_0, m0 = history[-1]
        h = lam(sigma_next) - lam(sigma)
        rks, d1s = [], []
        for k in range(1, order):
            sigma_k, m_k = history[-(k + 1)]
            rk = (lam(sigma_k) - lam(sigma_0)) / h
            rks.append(rk)
            d1s.append((m_k - m0) / rk)
        rks.append(1.0)
        b_h, rows, rhs = _coefficients(h, rks, order, self.variant)
        x_next = (sigma_next / sigma) * x - math.expm1(-h) * m0
        if model_next is None:
            if not d1s:
                return x_next
            rhos = [0.5] if order == 2 else np.linalg.solve(rows[:-1, :-1], rhs[:-1]).tolist()
            residual = sum(rho * d for rho, d in zip(rhos, d1s))
            return x_next - b_h * residual
        rhos = [0.5] if order == 1 else np.linalg.solve(rows, rhs).tolist()
        residual = sum((rho * d for rho, d in zip(rhos[:-1], d1s)), rhos[-1] * (model_next - m0))
        return x_next - b_h * residual

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
        steps = len(sigmas) - 1
        history: list[tuple[float, torch.Tensor]] = []
        last_x, last_order = None, 0
        for i in range(steps):
            sigma = sigmas[i]
            denoised = denoise(x, sigma)
            if self.corrector and last_x is not None:
                x = self._update(last_x, sigmas[i - 1], sigma, history, last_order, denoised)
            history = [*history, (sigma, denoised)][-self.order :]
            order = min(self.order, steps - i) if self.lower_order_final else self.order
            order = min(order, len(history))
            last_x, last_order = x, order
            if sigmas[i + 1] == 0:
                x = denoised  # the exact first-order step to sigma 0
            else:
                x = self._update(x, sigma, sigmas[i + 1], history, order)
            report(callback, i, x, sigma, sigma, denoised)
        return x
