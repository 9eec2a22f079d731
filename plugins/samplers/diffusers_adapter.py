"""``diffusers``: run any diffusers scheduler on our denoiser.

``--sampler diffusers --sampler-option scheduler=UniPCMultistepScheduler`` plus any of that
class's config options (``solver_order=3``, ``timestep_spacing=trailing``, ...). The
scheduler computes its own timesteps from ``--steps`` (the ``--schedule`` is not used) and
runs in its own standard loop; the model is evaluated through our sigma-space denoiser, so
guidance, batching and per-sample noise work as with every other sampler.

A diffusers scheduler draws its noise inside ``step()`` with ``randn_tensor``; for the
duration of each step that function is pointed at the run's ``noise(sigma, sigma_next)``,
which keeps every sample's randomness in its own generator (see DESIGN.md,
"Reproducibility").
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from plugins.samplers.updates import report, sigma_list
from toolkit.errors import DtkError, OptionError

if TYPE_CHECKING:
    import torch

    from toolkit.protocols import Denoiser, NoiseSource, StepCallback


class DiffusersScheduler:
    """Any ``diffusers`` scheduler class, by name, with its config options."""

    name = "diffusers"

    def __init__(self, scheduler: str = "DDIMScheduler", **config: Any) -> None:
        import diffusers

        cls = getattr(diffusers, scheduler, None)
        if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
            known = sorted(
                n
                for n in dir(diffusers)
                if n.endswith("Scheduler") and isinstance(getattr(diffusers, n, None), type)
            )
            raise OptionError(
                f"diffusers has no scheduler {scheduler!r}; choose one of: {', '.join(known)}"
            )
        accepted = _config_options(cls)
        unknown = sorted(set(config) - accepted)
        if unknown:
            raise OptionError(
                f"{scheduler} has no config option {unknown[0]!r}; its options: "
                f"{', '.join(sorted(accepted))}"
            )
        self.scheduler_class = cls
        self.config = config

    def make_scheduler(self, denoise: Any) -> Any:
        base = dict(getattr(denoise, "scheduler_config", None) or {})
        levels = getattr(denoise, "noise_levels", None)
        if not base:
            if levels is None or levels.sigmas is None:
                raise DtkError(
                    "the diffusers sampler needs a discrete-time model (its denoiser carries "
                    "no noise_levels)"
                )
            alphas_cumprod = levels.alphas_cumprod
            previous = alphas_cumprod.roll(1)
            previous[0] = 1.0
            base = {"num_train_timesteps": len(alphas_cumprod)}
            base["trained_betas"] = (1 - alphas_cumprod / previous).tolist()
        # The denoiser already returns x0; we hand the scheduler epsilon.
        base["prediction_type"] = "epsilon"
        accepted = _config_options(self.scheduler_class)
        base = {k: v for k, v in base.items() if k in accepted}
        return self.scheduler_class.from_config({**base, **self.config})

    def __call__(
        self,
        denoise: Denoiser,
        x: torch.Tensor,
        sigmas: Any,
        *,
        noise: NoiseSource,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        import torch

        levels = getattr(denoise, "noise_levels", None)
        if levels is None or levels.sigmas is None:
            raise DtkError("the diffusers sampler needs a discrete-time model")
        sigmas = sigma_list(sigmas)
        scheduler = self.make_scheduler(denoise)
        scheduler.set_timesteps(len(sigmas) - 1, device=x.device)
        # The run starts from the model's prior at sigmas[0]; the scheduler from its own.
        sample = x / math.sqrt(sigmas[0] ** 2 + 1) * float(scheduler.init_noise_sigma)
        timesteps = list(scheduler.timesteps)
        for i, t in enumerate(timesteps):
            sigma = float(levels.t_to_sigma(torch.as_tensor(float(t), dtype=torch.float64)))
            model_in = scheduler.scale_model_input(sample, t)
            x_ve = model_in * math.sqrt(sigma**2 + 1)
            denoised = denoise(x_ve, sigma)
            eps = (x_ve - denoised) / sigma
            if i + 1 < len(timesteps):
                t_next = float(timesteps[i + 1])
                sigma_next = float(levels.t_to_sigma(torch.as_tensor(t_next, dtype=torch.float64)))
            else:
                sigma_next = 0.0
            with _noise_from(scheduler, noise, sigma, sigma_next):
                sample = scheduler.step(eps, t, sample, return_dict=False)[0]
            report(callback, i, sample, sigma, sigma, denoised)
        return sample


def _config_options(cls: type) -> set[str]:
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


@contextlib.contextmanager
def _noise_from(
    scheduler: Any, noise: NoiseSource, sigma: float, sigma_next: float
) -> Iterator[None]:
    module = sys.modules[type(scheduler).__module__]
    original = getattr(module, "randn_tensor", None)
    if original is None:
        yield
        return

    def randn_tensor(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None,
                     layout: Any = None) -> torch.Tensor:  # fmt: skip
        draw = noise(sigma, sigma_next)
        if tuple(draw.shape) != tuple(shape):
            raise DtkError(f"scheduler asked for noise of shape {tuple(shape)}")
        return draw.to(device=device, dtype=dtype)

    module.randn_tensor = randn_tensor
    try:
        yield
    finally:
        module.randn_tensor = original
