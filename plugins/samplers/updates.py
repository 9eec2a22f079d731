"""Math shared by the built-in samplers (k-diffusion's conventions, sigma space).

Scalars (sigmas, step sizes, coefficients) are Python floats computed in double precision;
only the sample and the model's estimates are tensors. This keeps coefficient arithmetic
exact and free of device synchronisation.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from toolkit import DtkError, OptionError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from toolkit import NoiseSource, StepCallback


def sigma_list(sigmas: Any) -> list[float]:
    """The schedule as Python floats, checked: decreasing, ending in 0."""
    values = [float(s) for s in (sigmas.tolist() if hasattr(sigmas, "tolist") else sigmas)]
    if len(values) < 2:
        raise ValueError("a sampler needs at least two sigmas (one step)")
    if values[-1] != 0 or any(b >= a for a, b in itertools.pairwise(values)):
        raise ValueError("sigmas must be strictly decreasing and end in 0")
    return values


def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's derivative dx/dsigma (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step to `sigma_next` into a deterministic part and fresh noise.

    Returns ``(sigma_down, sigma_up)`` with ``sigma_down^2 + sigma_up^2 = sigma_next^2``;
    ``eta = 1`` gives the DDPM posterior, ``eta = 0`` the deterministic DDIM step.
    """
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(
        sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    )
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    return sigma_down, sigma_up


def check_noise_options(name: str, eta: float, s_noise: float) -> None:
    """Refuse, in one line naming sampler `name`, a negative `eta` or `s_noise`."""
    if eta < 0 or s_noise < 0:
        raise OptionError(f"{name}: eta and s_noise must be non-negative")


def lam(sigma: float) -> float:
    """Half the log-SNR, ``lambda = -log(sigma)``: DPM-Solver's time variable."""
    return -math.log(sigma)


def log_midpoint(a: float, b: float) -> float:
    """The geometric mean of two sigmas (midpoint in log sigma)."""
    return math.exp((math.log(a) + math.log(b)) / 2)


def churn(
    x: torch.Tensor,
    sigma: float,
    gamma: float,
    noise: NoiseSource,
    s_noise: float,
) -> tuple[torch.Tensor, float]:
    """Karras et al.'s stochastic "churn": raise the noise level by a factor ``1 + gamma``."""
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + noise(sigma, sigma_hat) * s_noise * math.sqrt(sigma_hat**2 - sigma**2)
    return x, sigma_hat


class Churn:
    """The churn options (k-diffusion's ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``)."""

    def __init__(
        self,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = math.inf,
        s_noise: float = 1.0,
    ) -> None:
        if s_churn < 0 or s_noise < 0:
            raise OptionError("s_churn and s_noise must be non-negative")
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = s_churn, s_tmin, s_tmax, s_noise

    def gamma(self, sigma: float, steps: int) -> float:
        if self.s_tmin <= sigma <= self.s_tmax:
            return min(self.s_churn / steps, math.sqrt(2) - 1)
        return 0.0


def lms_coefficient(order: int, sigmas: Sequence[float], i: int, j: int) -> float:
    """Integral over [sigmas[i], sigmas[i+1]] of the j-th Lagrange basis polynomial
    through sigmas[i], sigmas[i-1], ..., sigmas[i-order+1] (exact, not quadrature)."""
    from numpy.polynomial import Polynomial

    nodes = [sigmas[i - k] for k in range(order)]
    basis = Polynomial([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            basis = basis * Polynomial([-node, 1.0]) / (nodes[j] - node)
    antiderivative = basis.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


#: enough Gauss-Legendre points for the entire (or, for ``tab``, analytic in a wide strip)
#: integrands here to reach rounding error over any step a schedule takes
QUADRATURE_POINTS = 32


@functools.cache
def _gauss_legendre(points: int) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    return np.polynomial.legendre.leggauss(points)


def quadrature(a: float, b: float, points: int = QUADRATURE_POINTS) -> tuple[Any, Any]:
    """Gauss-Legendre nodes and weights for ``int_a^b`` (`a` > `b` integrates backwards)."""
    nodes, weights = _gauss_legendre(points)
    half = (b - a) / 2
    return half * nodes + (a + b) / 2, half * weights


def lagrange_integrals(nodes: Sequence[float], at: Any, weights: Any) -> list[float]:
    """``sum_k weights_k L_j(at_k)`` for each Lagrange basis polynomial ``L_j`` through
    `nodes` (``L_j(nodes_j) = 1``): with `at` and `weights` from `quadrature`, the integral
    of ``L_j`` against the weight folded into `weights`."""
    coefficients = []
    for j, node in enumerate(nodes):
        basis = weights
        for k, other in enumerate(nodes):
            if k != j:
                basis = basis * (at - other) / (node - other)
        coefficients.append(float(basis.sum()))
    return coefficients


def discrete_vp_levels(denoise: Any, sampler: str, why: str) -> Any:
    """The model's noise levels, refused in one line unless they are a discrete-time VP
    model's (the consistency samplers step through its training timesteps)."""
    levels = getattr(denoise, "noise_levels", None)
    if levels is None or getattr(levels, "is_flow", False) or not levels.is_discrete:
        raise DtkError(f"the {sampler} sampler needs a discrete-time VP model: {why}")
    return levels


def report(
    callback: StepCallback | None,
    i: int,
    x: torch.Tensor,
    sigma: float,
    sigma_hat: float,
    denoised: torch.Tensor,
) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})
