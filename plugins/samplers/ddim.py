"""DDIM (Song et al. 2021) and DDPM (Ho et al. 2020) ancestral sampling, in sigma space,
as diffusers' ``DDIMScheduler`` and ``DDPMScheduler`` compute them.

In k-diffusion's variables both are one ancestral Euler step. With ``eps = (x - x0) / sigma``
the DDIM update ``x' = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z`` with
``s = eta * sqrt((1 - a') / (1 - a) * (1 - a / a')) `` becomes, divided by ``sqrt(a')``,
``x' = x0 + sigma_down * eps + sigma_up * z`` where ``(sigma_down, sigma_up)`` is exactly
`ancestral_step(sigma, sigma', eta)`. ``eta = 1`` is the DDPM posterior
q(x_{t-1} | x_t, x0) with its "fixed small" variance.

Both schedulers can clip the predicted x0 (``clip_sample``) or threshold it dynamically
(``thresholding``, Saharia et al. 2022) before the update, and the two use the result
differently:

* DDIM replaces x0 by the clipped ``x0c`` but keeps the epsilon of the UNclipped
  prediction (``use_clipped_model_output=False``, what ``DDIMPipeline`` passes):
  ``x' = x0c + sigma_down * (x - x0) / sigma + sigma_up * z``.
* DDPM's posterior mean ``c0 x0 + ct x_t`` is linear in ``(x0, x_t)``; divided by
  ``sqrt(a')`` its coefficients are ``1 - sigma_down / sigma`` and ``sigma_down / sigma``
  (they must be: unclipped, it is the step above), so the clipped x0 enters both places:
  ``x' = x0c + sigma_down * (x - x0c) / sigma + sigma_up * z``.

Each clipping option defaults to None: as the model's scheduler config says (the
denoiser's ``scheduler_config``, read as diffusers reads it: the key if present, else the
default of the scheduler class the config names, else off). A denoiser without a scheduler
config (a plain function) is not clipped. True/False (and a number for the ranges) override.

DDPM's variance is the config's ``variance_type``, as ``DDPMScheduler._get_variance``
computes it from the step's ``a = 1 / (1 + sigma^2)`` and ``a' = 1 / (1 + sigma'^2)``, with
``beta = 1 - a / a'`` and the posterior variance ``v = (1 - a') / (1 - a) beta``:
``fixed_small`` (and ``fixed_small_log``) ``v``, the default, which is ``sigma_up`` above;
``fixed_large`` ``beta``; and for a learned-variance model (iDDPM), from the network's
variance channels ``p``, which the denoiser exposes as its ``variance`` after each call
(`toolkit.models.family.Model.variance`, the ``cond`` branch's under guidance):
``learned_range`` ``exp(f log beta + (1 - f) log v)`` with ``f = (p + 1) / 2``, per pixel,
and ``learned`` ``p`` itself. In sigma space the noise's scale is that standard deviation
over ``sqrt(a')``; the mean is the posterior mean whatever the variance. A denoiser that
exposes no variance gets ``v``. (``fixed_large_log`` is refused: diffusers takes the square
root of a log variance there, which is NaN.)
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from plugins.samplers.euler import _Ancestral
from plugins.samplers.updates import ancestral_step, report, sigma_list
from toolkit import OptionError

if TYPE_CHECKING:
    import torch

    from toolkit import Denoiser, NoiseSource, StepCallback

#: diffusers' defaults when neither the user nor the model's config says otherwise
_OFF = {
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
}


@dataclasses.dataclass(frozen=True)
class X0Clipping:
    """What happens to the predicted x0 before the update (diffusers' step, point 4 of
    ``DDIMScheduler.step``): dynamic thresholding if `thresholding`, else clipping to
    ``[-clip_sample_range, clip_sample_range]`` if `clip_sample`, else nothing."""

    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    @property
    def active(self) -> bool:
        return self.thresholding or self.clip_sample

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        if self.thresholding:
            return self.threshold(x0)
        if self.clip_sample:
            return x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0

    def threshold(self, x0: torch.Tensor) -> torch.Tensor:
        """Saharia et al. 2022: ``s`` is the `dynamic_thresholding_ratio` quantile of each
        sample's ``|x0|``, kept in ``[1, sample_max_value]``; x0 is clipped to ``[-s, s]``
        and divided by ``s`` (so ``s = 1`` is plain clipping to [-1, 1])."""
        import torch

        dtype = x0.dtype
        flat = x0.reshape(x0.shape[0], -1)
        if dtype not in (torch.float32, torch.float64):
            flat = flat.float()  # quantile needs float32/64
        s = torch.quantile(flat.abs(), self.dynamic_thresholding_ratio, dim=1)
        s = s.clamp(min=1, max=self.sample_max_value).unsqueeze(1)
        return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


def config_value(config: Mapping[str, Any] | None, key: str) -> Any:
    """`key` of a diffusers scheduler config as diffusers would read it: the value if the
    config has it, else the default of the class the config names (``_class_name``), else
    diffusers' "off" (`_OFF`). No config at all: off."""
    if not config:
        return _OFF[key]
    if key in config:
        return config[key]
    name = config.get("_class_name")
    if name:
        import diffusers

        cls = getattr(diffusers, name, None)
        if isinstance(cls, type):
            parameter = inspect.signature(cls.__init__).parameters.get(key)
            if parameter is not None and parameter.default is not parameter.empty:
                return parameter.default
    return _OFF[key]


class _Clipping:
    """The clipping options of `ddim` and `ddpm` (None: as the model's scheduler config)."""

    def __init__(
        self,
        clip_sample: bool | None = None,
        clip_sample_range: float | None = None,
        thresholding: bool | None = None,
        dynamic_thresholding_ratio: float | None = None,
        sample_max_value: float | None = None,
    ) -> None:
        if clip_sample_range is not None and not clip_sample_range > 0:
            raise OptionError("clip_sample_range must be positive")
        if dynamic_thresholding_ratio is not None and not 0 < dynamic_thresholding_ratio <= 1:
            raise OptionError("dynamic_thresholding_ratio must be in (0, 1]")
        if sample_max_value is not None and not sample_max_value >= 1:
            raise OptionError("sample_max_value must be at least 1")
        self.clipping_options = {
            "clip_sample": clip_sample,
            "clip_sample_range": clip_sample_range,
            "thresholding": thresholding,
            "dynamic_thresholding_ratio": dynamic_thresholding_ratio,
            "sample_max_value": sample_max_value,
        }

    def clipping(self, denoise: Any) -> X0Clipping:
        """The clipping for this run: the options given, the rest from `denoise`'s
        scheduler config."""
        config = getattr(denoise, "scheduler_config", None)
        values = {
            key: config_value(config, key) if value is None else value
            for key, value in self.clipping_options.items()
        }
        return X0Clipping(
            clip_sample=bool(values["clip_sample"]),
            clip_sample_range=float(values["clip_sample_range"]),
            thresholding=bool(values["thresholding"]),
            dynamic_thresholding_ratio=float(values["dynamic_thresholding_ratio"]),
            sample_max_value=float(values["sample_max_value"]),
        )


class DDIM(_Ancestral, _Clipping):
    """Denoising diffusion implicit models; ``eta = 0`` (default) is deterministic."""

    name = "ddim"

    def __init__(
        self,
        eta: float = 0.0,
        clip_sample: bool | None = None,
        clip_sample_range: float | None = None,
        thresholding: bool | None = None,
        dynamic_thresholding_ratio: float | None = None,
        sample_max_value: float | None = None,
    ) -> None:
        _Ancestral.__init__(self, eta=eta, s_noise=1.0)
        _Clipping.__init__(
            self,
            clip_sample,
            clip_sample_range,
            thresholding,
            dynamic_thresholding_ratio,
            sample_max_value,
        )

    #: DDIM's direction term uses the epsilon of the unclipped x0
    clipped_eps = False

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
        clip = self.clipping(denoise)
        variance_type = self.variance_type(denoise)
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoise(x, sigma)
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next, self.eta)
            if clip.active:
                clipped = clip(denoised)
                eps = (x - (clipped if self.clipped_eps else denoised)) / sigma
                x = clipped + eps * sigma_down
                denoised = clipped
            else:  # the ancestral Euler step, as k-diffusion writes it
                x = x + (x - denoised) / sigma * (sigma_down - sigma)
            if variance_type is not None and sigma_next > 0:
                variance = getattr(denoise, "variance", None)
                sigma_up = step_noise_scale(variance_type, sigma, sigma_next, variance, x)
                x = x + noise(sigma, sigma_next) * sigma_up
            else:
                x = self.add_noise(x, sigma, sigma_next, sigma_up, noise)
            report(callback, i, x, sigma, sigma, denoised)
        return x

    def variance_type(self, denoise: Any) -> str | None:
        """The step's variance when it is not the ancestral step's ``sigma_up`` (DDIM's
        always is)."""
        return None


class DDPM(DDIM):
    """Ancestral sampling from the DDPM posterior, with the variance the model's config
    names ("fixed small" by default; a learned one from the model)."""

    name = "ddpm"

    def __init__(
        self,
        clip_sample: bool | None = None,
        clip_sample_range: float | None = None,
        thresholding: bool | None = None,
        dynamic_thresholding_ratio: float | None = None,
        sample_max_value: float | None = None,
    ) -> None:
        super().__init__(
            1.0,
            clip_sample,
            clip_sample_range,
            thresholding,
            dynamic_thresholding_ratio,
            sample_max_value,
        )

    #: the posterior mean takes the clipped x0 in both of its terms
    clipped_eps = True

    def variance_type(self, denoise: Any) -> str | None:
        """The model's ``variance_type``, when it is other than the fixed small one."""
        config = getattr(denoise, "scheduler_config", None) or {}
        variance_type = config.get("variance_type") or "fixed_small"
        if variance_type in ("fixed_small", "fixed_small_log"):
            return None
        if variance_type in ("fixed_large", *LEARNED):
            return variance_type
        why = "diffusers has no such variance"
        if variance_type == "fixed_large_log":
            why = "diffusers' DDPMScheduler takes the square root of its log variance: NaN"
        raise OptionError(
            f"ddpm cannot sample with the model's variance_type {variance_type!r} ({why}); "
            f"it follows fixed_small, fixed_small_log, fixed_large, {', '.join(LEARNED)}"
        )


#: the variance types whose variance the model predicts
LEARNED = ("learned", "learned_range")


def step_noise_scale(variance_type: str, sigma: float, sigma_next: float,
                     predicted: torch.Tensor | None, x: torch.Tensor) -> Any:  # fmt: skip
    """The standard deviation of a DDPM step's fresh noise in sigma space (a float, or a
    tensor like `x` for a learned variance), as ``DDPMScheduler`` computes it (see the
    module docstring); `predicted` is the model's variance channels, or None."""
    import torch

    a, a_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
    beta = 1 - a / a_next
    small = max((1 - a_next) / (1 - a) * beta, 1e-20)
    scale = math.sqrt(a_next)  # x_t-space deviations / sqrt(a') = sigma-space ones
    if variance_type == "fixed_large":
        return math.sqrt(beta) / scale
    if predicted is None:  # a denoiser that exposes no variance: the fixed small one
        return math.sqrt(small) / scale
    predicted = predicted.to(x.dtype)
    if variance_type == "learned":
        return predicted.sqrt() / scale
    frac = (predicted + 1) / 2
    log_variance = frac * math.log(beta) + (1 - frac) * math.log(small)
    return torch.exp(0.5 * log_variance) / scale
