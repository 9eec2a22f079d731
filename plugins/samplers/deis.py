"""DEIS, the diffusion exponential integrator sampler (Zhang & Chen, "Fast Sampling of
Diffusion Models with Exponential Integrator", ICLR 2023, arXiv:2204.13902), multistep.

In sigma space the probability-flow ODE is ``dx/dsigma = eps(x, sigma)`` with
``eps = (x - D(x, sigma)) / sigma``, so a step is ``x' = x + int_sigma^sigma' eps ds``.
DEIS extrapolates ``eps`` by the Lagrange polynomial through the last `order` estimates in
a time variable ``T(sigma)`` and integrates it exactly: ``x' = x + sum_j c_j eps_j`` with
``c_j = int_sigma^sigma' L_j(T(s)) ds``. The variants differ only in ``T``:

* ``mode=logrho`` (the default), ``T = log sigma``: diffusers' ``DEISMultistepScheduler``
  (``algorithm_type="deis"``, ``solver_type="logrho"``; ``rho = sigma_t / alpha_t`` is our
  sigma), which also writes the integrals in closed form. Its defaults are ours:
  ``solver_order=2`` and ``lower_order_final``, which below 15 steps lowers the order of
  the last steps to the steps left (order 1 on the last, at most 2 on the one before).
* ``mode=tab``, ``T = t(sigma)``, the VP-SDE time of EDM's VP parameterization (``beta_d``,
  ``beta_min`` fitted to ``sigma`` in ``[0.002, 80]`` over ``t`` in ``[1e-3, 1]``,
  whatever the model): ComfyUI's ``deis`` (``deis_mode="tab"``, ``max_order=3``;
  ``comfy/k_diffusion/deis.py``, from zju-pi's diff-sampler), which integrates
  ``L_j(t) dsigma/dt`` over ``t`` with a 10,000-point Riemann sum; no lower-order steps at
  the end.

Both warm up (order at most the number of estimates so far) and land on the estimate on a
last step to sigma 0. Here the integrals are taken by Gauss-Legendre quadrature in
``log s``, on which the integrands are smooth, to rounding error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from plugins.samplers.updates import lagrange_integrals, quadrature, report, sigma_list, to_d
from toolkit import OptionError

if TYPE_CHECKING:
    import torch

    from toolkit import Denoiser, NoiseSource, StepCallback


def _edm_vp_constants(sigma_min: float = 0.002, sigma_max: float = 80.0,
                      eps_s: float = 1e-3) -> tuple[float, float]:  # fmt: skip
    """``(beta_d, beta_min)`` of the VP-SDE whose noise runs from `sigma_min` at
    ``t = eps_s`` to `sigma_max` at ``t = 1`` (ComfyUI's ``edm2t`` defaults)."""
    beta_d = 2 * (math.log(sigma_min**2 + 1) / eps_s - math.log(sigma_max**2 + 1)) / (eps_s - 1)
    return beta_d, math.log(sigma_max**2 + 1) - 0.5 * beta_d


def edm_vp_time(sigma: Any) -> Any:
    """DEIS's ``t`` of `sigma` (float or array): the inverse of
    ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``."""
    import numpy as np

    beta_d, beta_min = _edm_vp_constants()
    return (np.sqrt(beta_min**2 + 2 * beta_d * np.log1p(np.square(sigma))) - beta_min) / beta_d


def log_rho(sigma: Any) -> Any:
    """diffusers' ``log rho`` of `sigma` (float or array): ``log sigma``."""
    import numpy as np

    return np.log(sigma)


#: DEIS's time variables, by mode
TIMES: dict[str, Callable[[Any], Any]] = {"logrho": log_rho, "tab": edm_vp_time}


def deis_coefficients(mode: str, history: Sequence[float], sigma_next: float) -> list[float]:
    """``c_j = int_{history[0]}^{sigma_next} L_j(T(s)) ds``, the weights of the ODE
    derivatives at the sigmas in `history` (current first), for `mode`'s time ``T``."""
    import numpy as np

    time = TIMES[mode]
    u, weights = quadrature(math.log(history[0]), math.log(sigma_next))
    s = np.exp(u)  # ds = s du
    return lagrange_integrals([float(time(h)) for h in history], time(s), weights * s)


class DEIS:
    """DEIS multistep (see the module docstring). `order` (1 to 3; ``tab``: to 4) and
    `lower_order_final` default to None: the mode's reference's, diffusers' 2 and true for
    ``logrho``, ComfyUI's 3 and false for ``tab``."""

    name = "deis"

    def __init__(
        self,
        order: int | None = None,
        mode: Literal["logrho", "tab"] = "logrho",
        lower_order_final: bool | None = None,
    ) -> None:
        if mode not in TIMES:
            raise OptionError(f"deis: mode must be logrho or tab, got {mode!r}")
        top = 3 if mode == "logrho" else 4
        if order is not None and not 1 <= order <= top:
            raise OptionError(f"deis: order must be 1 to {top} with mode={mode}")
        if order is None:
            order = 2 if mode == "logrho" else 3
        if lower_order_final is None:
            lower_order_final = mode == "logrho"
        self.mode, self.order, self.lower_order_final = mode, order, lower_order_final

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
        # diffusers lowers the final orders only below 15 steps
        lower = self.lower_order_final and steps < 15
        history: list[tuple[float, torch.Tensor]] = []  # (sigma, eps), the newest first
        for i in range(steps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoise(x, sigma)
            history = [(sigma, to_d(x, sigma, denoised)), *history][: self.order]
            order = min(self.order, len(history), steps - i if lower else self.order)
            if sigma_next == 0:
                x = denoised  # the first-order step to 0, exactly
            elif order == 1:
                x = x + history[0][1] * (sigma_next - sigma)
            else:
                used = history[:order]
                coefficients = deis_coefficients(self.mode, [s for s, _ in used], sigma_next)
                x = x + sum(c * d for c, (_, d) in zip(coefficients, used))
            report(callback, i, x, sigma, sigma, denoised)
        return x
