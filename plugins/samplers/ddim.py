"""DDIM (Song et al. 2021) and DDPM (Ho et al. 2020) ancestral sampling, in sigma space.

In k-diffusion's variables both are one ancestral Euler step. With ``eps = (x - x0) / sigma``
the DDIM update ``x' = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z`` with
``s = eta * sqrt((1 - a') / (1 - a) * (1 - a / a')) `` becomes, divided by ``sqrt(a')``,
``x' = x0 + sigma_down * eps + sigma_up * z`` where ``(sigma_down, sigma_up)`` is exactly
`ancestral_step(sigma, sigma', eta)`. ``eta = 1`` is the DDPM posterior
q(x_{t-1} | x_t, x0) with its "fixed small" variance. So diffusers' DDIM (``clip_sample``
off) and DDPM schedulers give the same samples as these classes on the same sigmas.
"""

from __future__ import annotations

from plugins.samplers.euler import EulerAncestral


class DDIM(EulerAncestral):
    """Denoising diffusion implicit models; ``eta = 0`` (default) is deterministic."""

    name = "ddim"

    def __init__(self, eta: float = 0.0) -> None:
        super().__init__(eta=eta, s_noise=1.0)


class DDPM(EulerAncestral):
    """Ancestral sampling from the DDPM posterior (variance "fixed small")."""

    name = "ddpm"

    def __init__(self) -> None:
        super().__init__(eta=1.0, s_noise=1.0)
