"""Built-in noise schedules: ``steps + 1`` strictly decreasing sigmas ending in 0.

``leading``, ``trailing`` and ``linspace`` reproduce the sigmas diffusers'
``EulerDiscreteScheduler`` computes for that ``timestep_spacing`` (Lin et al. 2023, table 2),
``linspace variant=dpmsolver`` those of ``DPMSolverMultistepScheduler`` and ``UniPC``;
``karras``, ``exponential``, ``polyexponential`` and ``vp`` follow k-diffusion;
``beta`` is Lee et al. 2024 as diffusers' ``use_beta_sigmas``; ``flow`` is a rectified-flow
model's own and ``lcm`` a latent consistency model's (``LCMScheduler``'s timesteps);
``laplace`` is k-diffusion's and ``align_your_steps`` NVIDIA's published tables. ComfyUI's
own schedulers are in ``plugins/comfy_schedules.py``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import toolkit
from toolkit import DtkError, lazy_import

if TYPE_CHECKING:
    import numpy as np
    import torch

    from toolkit import NoiseLevels
else:
    np = lazy_import("numpy")
    torch = lazy_import("torch")


def _check_steps(name: str, steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DtkError(f"schedule {name!r} needs a whole number of steps >= 1, got {steps!r}")


def _finish(name: str, sigmas: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Append the final 0 and check the contract: strictly decreasing, positive, finite but
    for a flow model's start at ``t = 1`` (``sigma = inf``, the first sigma only)."""
    if isinstance(sigmas, np.ndarray):  # a reversed view has negative strides torch refuses
        sigmas = np.array(sigmas, dtype=np.float64)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    if not bool(torch.isfinite(sigmas[1:]).all()) or not bool((sigmas[:-1] > 0).all()):
        raise DtkError(f"schedule {name!r} produced a non-finite or non-positive sigma")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise DtkError(
            f"schedule {name!r} with {len(sigmas) - 1} steps repeats a noise level; "
            "use fewer steps or another schedule"
        )
    return sigmas


def _discrete(name: str, noise: NoiseLevels) -> np.ndarray:
    if noise.is_flow:
        raise DtkError(f"schedule {name!r} spaces a VP model's training timesteps; this is a "
                       "rectified-flow model: use --schedule flow")  # fmt: skip
    if noise.sigmas is None:
        raise DtkError(
            f"schedule {name!r} spaces a model's discrete training timesteps; this model is "
            "continuous-time: use karras, exponential or polyexponential"
        )
    return noise.sigmas.numpy()


def _range(
    noise: NoiseLevels, sigma_min: float | None, sigma_max: float | None
) -> tuple[float, float]:
    low = noise.sigma_min if sigma_min is None else sigma_min
    high = noise.sigma_max if sigma_max is None else sigma_max
    if math.isinf(high):
        raise DtkError(
            "this is a rectified-flow model, whose noise reaches sigma = inf (t = 1): use "
            "--schedule flow, or give this schedule a finite sigma_max"
        )
    if not 0 < low < high:
        raise DtkError(f"need 0 < sigma_min < sigma_max, got {low} and {high}")
    return low, high


def _at_timesteps(train_sigmas: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    # diffusers interpolates sigma linearly between integer timesteps
    return np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)


class Leading:
    """Timesteps ``0, k, 2k, ...`` (k = T // steps) taken from the top, plus `offset`.

    The spacing of the original DDPM/DDIM and Stable Diffusion (which uses ``offset=1``).
    """

    name = "leading"

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset

    def __call__(self, steps: int, noise: NoiseLevels) -> torch.Tensor:
        _check_steps(self.name, steps)
        sigmas = _discrete(self.name, noise)
        ratio = len(sigmas) // steps
        if ratio == 0:
            raise DtkError(f"schedule 'leading' cannot take {steps} of {len(sigmas)} timesteps")
        timesteps = (np.arange(0, steps) * ratio).round()[::-1].astype(np.float32) + self.offset
        if timesteps.max() > len(sigmas) - 1:
            raise DtkError(f"schedule 'leading': offset {self.offset} passes the last timestep")
        return _finish(self.name, _at_timesteps(sigmas, timesteps))


class Trailing:
    """Timesteps counted down from the last one, ``T-1, T-1-k, ...`` (k = T / steps).

    Starts at the model's noisiest level, which few-step sampling needs.
    """

    name = "trailing"

    def __call__(self, steps: int, noise: NoiseLevels) -> torch.Tensor:
        _check_steps(self.name, steps)
        sigmas = _discrete(self.name, noise)
        ratio = len(sigmas) / steps
        timesteps = np.arange(len(sigmas), 0, -ratio).round().astype(np.float32) - 1
        return _finish(self.name, _at_timesteps(sigmas, timesteps))


class Linspace:
    """Evenly spaced timesteps from ``T-1`` down to 0, as diffusers' ``linspace`` spacing.

    diffusers has two: `variant` ``euler`` (EulerDiscrete, Heun, KDPM2, LMS) takes `steps`
    fractional timesteps ``linspace(0, T-1, steps)``, the last at t = 0; ``dpmsolver``
    (DPMSolverMultistep, DPMSolverSinglestep, UniPCMultistep) divides ``[0, T-1]`` into
    `steps` intervals, rounds the ``steps + 1`` ends to integers and drops t = 0: the last
    step goes from ``round((T-1) / steps)`` straight to sigma 0 (their default
    ``final_sigmas_type="zero"``; DEIS and SA-Solver take the same timesteps but end at the
    first training sigma).
    """

    name = "linspace"

    def __init__(self, variant: Literal["euler", "dpmsolver"] = "euler") -> None:
        if variant not in ("euler", "dpmsolver"):
            raise DtkError(f"linspace: variant must be euler or dpmsolver, got {variant!r}")
        self.variant = variant

    def __call__(self, steps: int, noise: NoiseLevels) -> torch.Tensor:
        _check_steps(self.name, steps)
        sigmas = _discrete(self.name, noise)
        last = len(sigmas) - 1
        if self.variant == "euler":
            timesteps = np.linspace(0, last, steps, dtype=np.float32)[::-1]
        else:
            timesteps = np.linspace(0, last, steps + 1).round()[::-1][:-1]
        return _finish(self.name, _at_timesteps(sigmas, timesteps))


class Karras:
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in ``sigma^(1/rho)``."""

    name = "karras"

    def __init__(
        self, rho: float = 7.0, sigma_min: float | None = None, sigma_max: float | None = None
    ) -> None:
        if rho <= 0:
            raise DtkError("karras: rho must be positive")
        self.rho, self.sigma_min, self.sigma_max = rho, sigma_min, sigma_max

    def __call__(self, steps: int, noise: NoiseLevels) -> torch.Tensor:
        _check_steps(self.name, steps)
        low, high = _range(noise, self.sigma_min, self.sigma_max)
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        min_inv_rho, max_inv_rho = low ** (1 / self.rho), high ** (1 / self.rho)
        return _finish(self.name, (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** self.rho)


class Exponential:
    """Sigmas evenly spaced in log sigma."""

    name = "exponential"

    def __init__(self, sigma_min: float | None = None, sigma_max: float | None = None) -> None:
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, steps: int, noise: NoiseLevels) -> torch.Tensor:
        _check_steps(self.name, steps)
        low, high = _range(noise, self.sigma_min, self.sigma_max)
        log_sigmas = torch.linspace(math.log(high), math.log(low), steps, dtype=torch.float64)
        return _finish(self.name, log_sigmas.exp())


class Polyexponential:
    """Log sigma following a polynomial ramp of power `rho` (``rho=1`` is exponential)."""

    name = "polyexponential"

    def __init__(
        self, rho: float = 1.0, sigma_min: float | None = None, sigma_max: float | None = None
    ) -> None:
        if rho <= 0:
            raise DtkError("polyexponential: rho must be positive")
        self.rho, self.sigma_min, self.sigma_max = rho, sigma_min, sigma_max

    def __call__(self, steps: int, noise: NoiseLevels) -> torch.Tensor:
        _check_steps(self.name, steps)
        low, high = _range(noise, self.sigma_min, self.sigma_max)
        ramp = torch.linspace(1, 0, steps, dtype=torch.float64) ** self.rho
        return _finish(
            self.name, torch.exp(ramp * (math.log(high) - math.log(low)) + math.log(low))
        )


class Beta:
    """Lee et al. 2024, "Beta sampling is all you need": sigma quantiles of a Beta(a, b).

    Puts more steps at both ends of the noise range; as diffusers' ``use_beta_sigmas``.
    """

    name = "beta"

    def __init__(
        self,
        alpha: float = 0.6,
        beta: float = 0.6,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
    ) -> None:
        if alpha <= 0 or beta <= 0:
            raise DtkError("beta: alpha and beta must be positive")
        self.alpha, self.beta = alpha, beta
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, steps: int, noise: NoiseLevels) -> torch.Tensor:
        from scipy import stats

        _check_steps(self.name, steps)
        low, high = _range(noise, self.sigma_min, self.sigma_max)
        quantiles = stats.beta.ppf(1 - np.linspace(0, 1, steps), self.alpha, self.beta)
        return _finish(self.name, low + quantiles * (high - low))


class VP:
    """The continuous VP-SDE's noise levels (Song et al. 2021), as k-diffusion's ``vp``."""

    name = "vp"

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> None:
        if not 0 < eps_s < 1:
            raise DtkError("vp: eps_s must be in (0, 1)")
        self.beta_d, self.beta_min, self.eps_s = beta_d, beta_min, eps_s

    def __call__(self, steps: int, noise: NoiseLevels) -> torch.Tensor:
        _check_steps(self.name, steps)
        t = torch.linspace(1, self.eps_s, steps, dtype=torch.float64)
        return _finish(
            self.name, torch.sqrt(torch.exp(self.beta_d * t**2 / 2 + self.beta_min * t) - 1)
        )


class Flow:
    """A rectified-flow model's own schedule, in sigma space (``sigma = t / (1 - t)``), with
    the model's shift (`toolkit.NoiseLevels`' flow counterpart holds it).

    `variant` ``euler`` is diffusers' ``FlowMatchEulerDiscreteScheduler``: ``steps`` times
    evenly spaced from ``t = 1`` (``sigma = inf``) to the smallest training time, shifted
    (that smallest time is shifted once already, as diffusers does); ComfyUI calls the
    model's own spacing "simple" and the shift "model sampling shift". ``dpmsolver`` is
    ``DPMSolverMultistepScheduler(use_flow_sigmas=True)``'s: ``steps + 1`` times evenly
    spaced in ``alpha = 1 - t`` from 1 to ``1 / N``, shifted, the last dropped, so it starts
    just short of pure noise. ``uniform`` is ``FluxPipeline``'s: the times ``1, (steps - 1) /
    steps, ..., 1 / steps``, shifted. Without a variant, the model's own (its pipeline's:
    ``uniform`` for Flux, ``euler`` otherwise; `FlowLevels.spacing`).
    """

    name = "flow"

    def __init__(self, variant: Literal["euler", "dpmsolver", "uniform"] | None = None) -> None:
        if variant not in (None, "euler", "dpmsolver", "uniform"):
            raise DtkError(f"flow: variant must be euler, dpmsolver or uniform, got {variant!r}")
        self.variant = variant

    def __call__(self, steps: int, noise: NoiseLevels) -> torch.Tensor:
        _check_steps(self.name, steps)
        if not noise.is_flow:
            raise DtkError("schedule 'flow' is for rectified-flow models; this is a VP model")
        n = noise.num_train_timesteps
        variant = self.variant or getattr(noise, "spacing", "euler")
        if variant == "euler":
            high = float(np.float32(noise.shifted(np.float32(1.0))))
            t = np.linspace(high * n, noise.t_min * n, steps) / n
        elif variant == "uniform":  # float32 before the shift, as diffusers takes them
            t = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
        else:
            t = (1.0 - np.linspace(1, 1 / n, steps + 1))[::-1][:-1].copy()
        # float32, as diffusers keeps its sigmas
        t = torch.from_numpy(np.asarray(noise.shifted(t), dtype=np.float32)).double()
        sigma = torch.where(t >= 1, torch.full_like(t, math.inf), t / (1 - t))
        return _finish(self.name, sigma)


class LCM:
    """A latent consistency model's timesteps, as diffusers' ``LCMScheduler`` takes them
    (Luo et al. 2023): the distillation's skipping-step schedule ``k - 1, 2k - 1, ..., T - 1``
    (``k = T // original_inference_steps``), of which `steps` are taken evenly by index from
    the top (``floor(linspace(0, original, steps, endpoint=False))``), at their training
    sigmas. `original_inference_steps` None is the model's (its scheduler config's, else
    50); `steps` may not exceed it.
    """

    name = "lcm"

    def __init__(self, original_inference_steps: int | None = None) -> None:
        if original_inference_steps is not None and original_inference_steps < 1:
            raise DtkError("lcm: original_inference_steps must be at least 1")
        self.original_inference_steps = original_inference_steps

    def __call__(self, steps: int, noise: NoiseLevels) -> torch.Tensor:
        _check_steps(self.name, steps)
        sigmas = _discrete(self.name, noise)
        original = self.original_inference_steps or getattr(
            noise, "original_inference_steps", None) or 50  # fmt: skip
        if original > len(sigmas):
            raise DtkError(f"schedule 'lcm': original_inference_steps {original} exceeds the "
                           f"model's {len(sigmas)} training timesteps")  # fmt: skip
        if steps > original:
            raise DtkError(f"schedule 'lcm' takes at most original_inference_steps = {original} "
                           f"steps, got {steps}")  # fmt: skip
        skip = len(sigmas) // original
        origin = (np.arange(1, original + 1) * skip - 1)[::-1]
        chosen = np.floor(np.linspace(0, original, num=steps, endpoint=False)).astype(np.int64)
        return _finish(self.name, sigmas[origin[chosen]])


class Laplace:
    """Hang et al. 2024 ("Improved noise schedule for diffusion training"), as k-diffusion's
    and ComfyUI's ``get_sigmas_laplace``: ``log sigma`` at the quantiles of a Laplace(mu,
    beta) distribution of `steps` evenly spaced probabilities (``1e-5`` from the ends),
    clamped to ``[sigma_min, sigma_max]``. Concentrates the steps around ``sigma = e^mu``."""

    name = "laplace"

    def __init__(self, mu: float = 0.0, beta: float = 0.5, sigma_min: float | None = None,
                 sigma_max: float | None = None) -> None:  # fmt: skip
        if beta <= 0:
            raise DtkError("laplace: beta must be positive")
        self.mu, self.beta = mu, beta
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, steps: int, noise: NoiseLevels) -> torch.Tensor:
        _check_steps(self.name, steps)
        low, high = _range(noise, self.sigma_min, self.sigma_max)
        x = np.linspace(0, 1, steps)
        log_sigma = self.mu - self.beta * np.sign(0.5 - x) * np.log(1 - 2 * np.abs(0.5 - x)
                                                                     + 1e-5)  # fmt: skip
        return _finish(self.name, np.clip(np.exp(log_sigma), low, high))


#: Align Your Steps (Sabour et al. 2024): the optimized 10-step noise levels NVIDIA
#: published for each model (research.nvidia.com/labs/toronto-ai/AlignYourSteps), the last
#: being the model's smallest training level (diffusers' `AysSchedules` hold the same values
#: with that last level replaced by 0)
AYS_LEVELS = {
    "sd1": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
    "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}


class AlignYourSteps:
    """Align Your Steps (Sabour et al. 2024): the published 10-step levels of `model`
    (``sd1``: SD 1.x/2.x-style VP models, ``sdxl``, ``svd``), for another step count
    interpolated linearly in ``log sigma`` over an even grid (the paper's ``loglinear_interp``,
    as ComfyUI's ``AlignYourStepsScheduler``), the last level then replaced by 0."""

    name = "align_your_steps"

    def __init__(self, model: Literal["sd1", "sdxl", "svd"] = "sd1") -> None:
        if model not in AYS_LEVELS:
            raise DtkError(f"align_your_steps: model must be one of {', '.join(AYS_LEVELS)}, "
                           f"got {model!r}")  # fmt: skip
        self.model = model

    def __call__(self, steps: int, noise: NoiseLevels) -> torch.Tensor:
        _check_steps(self.name, steps)
        if getattr(noise, "is_flow", False):
            raise DtkError("schedule 'align_your_steps' holds levels of VP models (SD 1.x, "
                           "SDXL, SVD); this is a rectified-flow model: use --schedule "
                           "flow")  # fmt: skip
        return _finish(self.name, loglinear_interp(AYS_LEVELS[self.model], steps + 1)[:-1])


def loglinear_interp(levels: Any, count: int) -> np.ndarray:
    """`count` levels from the decreasing `levels`, interpolated linearly in ``log level``
    over an even grid, the ends kept (the ``loglinear_interp`` of Align Your Steps' code,
    which ComfyUI's AYS, GITS and OptimalSteps nodes copy)."""
    logs = np.log(np.asarray(levels, dtype=np.float64)[::-1])
    grid = np.linspace(0, 1, len(logs))
    return np.exp(np.interp(np.linspace(0, 1, count), grid, logs))[::-1].copy()


SCHEDULES = (Leading, Trailing, Linspace, Karras, Exponential, Polyexponential, Beta, VP, Flow,
             LCM, Laplace, AlignYourSteps)  # fmt: skip


@toolkit.hookimpl
def register_schedules(register: toolkit.Register) -> None:
    for schedule in SCHEDULES:
        register(schedule)
