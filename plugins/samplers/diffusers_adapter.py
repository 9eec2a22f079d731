"""``diffusers``: run a diffusers scheduler on our denoiser.

``--sampler diffusers --sampler-option scheduler=UniPCMultistepScheduler`` plus any of that
class's config options (``solver_order=3``, ``timestep_spacing=trailing``, ...). Without
``scheduler=`` it runs the class the model's own scheduler config names (``_class_name``),
as a diffusers pipeline loaded from the folder would; ``DDIMScheduler`` when the model has no
scheduler config. The scheduler computes its own timesteps from ``--steps`` (the
``--schedule`` is not used) and runs in its own standard loop; the model is evaluated
through our sigma-space denoiser, so guidance, batching and per-sample noise work as with
every other sampler.

A diffusers scheduler draws its noise inside ``step()`` with ``randn_tensor``; for the
duration of each step that function is pointed at the run's ``noise(sigma, sigma_next)``,
which keeps every sample's randomness in its own generator (docs/contracts.md,
"Reproducibility"): a sample does not depend on the batch it is in or on the run.

Only the schedulers in `SUPPORTED` run here: discrete-time VP (DDPM-trained) schedulers
whose noise levels are the model's training ones and whose noise comes from
``randn_tensor``. The others are refused with the reason in `REFUSED` (flow-matching, VE,
EDM and consistency models, token models, inversion, pipeline-specific steps, Brownian-tree
noise), or, for a class this list does not know yet, because nobody has checked it.

A rectified-flow model (SD 3) runs its own scheduler when its config names one of
`FLOW_SUPPORTED` (``FlowMatchEulerDiscreteScheduler``), and nothing else: the scheduler is
handed the velocity, with the model's shift (and, for Flux, the times its pipeline hands
it: ``FlowLevels.spacing`` ``uniform``). Its first step, from pure noise (``t = 1``,
sigma = inf), is the engine's, which every first-order step shares
(`toolkit.sampling.engine.integrate`); the scheduler takes the others, so ``--schedule
flow`` (the family's default), whose times are the scheduler's, must bring the run there.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from plugins.samplers.updates import report, sigma_list
from toolkit import DtkError, OptionError

if TYPE_CHECKING:
    import torch

    from toolkit import Denoiser, NoiseSource, StepCallback

#: Schedulers checked to run on a discrete-time VP model with per-sample noise
#: (`tests/test_diffusers_adapter.py` runs each).
SUPPORTED = frozenset({
    "DDIMScheduler",
    "DDIMParallelScheduler",
    "DDPMScheduler",
    "DDPMParallelScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LCMScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "SASolverScheduler",
    "TCDScheduler",
    "UniPCMultistepScheduler",
})  # fmt: skip

_VP = "the diffusers sampler runs discrete-time VP (DDPM-trained) schedulers"
_FLOW = (
    f"is for rectified-flow (flow-matching) models; {_VP}, and a flow model's own "
    "FlowMatchEulerDiscreteScheduler (leave scheduler= out)"
)
#: Schedulers a rectified-flow model runs when its own scheduler config names them (checked
#: against diffusers' loop by `tests/test_sd3.py`); naming them with scheduler= is refused,
#: since the class alone does not say the model is a flow one.
FLOW_SUPPORTED = frozenset({"FlowMatchEulerDiscreteScheduler"})
_TOKENS = "is for discrete-token models, not for denoising continuous images"

#: Why each other diffusers scheduler cannot run here (completes "NAME ...").
REFUSED = {
    "FlowMatchEulerDiscreteScheduler": _FLOW,
    "FlowMatchHeunDiscreteScheduler": _FLOW,
    "FlowMatchLCMScheduler": _FLOW,
    "FlowMapEulerDiscreteScheduler": _FLOW,
    "LTXEulerAncestralRFScheduler": _FLOW,
    "MiniMaxH3Scheduler": _FLOW,
    "PiflowScheduler": _FLOW,
    "HeliosScheduler": _FLOW,
    "HeliosDMDScheduler": _FLOW,
    "RFD4ProteinaScheduler": f"is for protein-structure flow models; {_VP}",
    "SCMScheduler": f"is for continuous-time (TrigFlow) consistency models; {_VP}",
    "CMStochasticIterativeScheduler": f"is for consistency models in EDM's sigma space; {_VP}",
    "ScoreSdeVeScheduler": f"is for variance-exploding (score SDE) models; {_VP}",
    "KarrasVeScheduler": f"is for variance-exploding models; {_VP}",
    "EDMEulerScheduler": (
        f"is for continuous-time EDM models (its timesteps are log(sigma) / 4); {_VP}: "
        "use --sampler euler --schedule karras"
    ),
    "EDMDPMSolverMultistepScheduler": (
        f"is for continuous-time EDM models (its timesteps are log(sigma) / 4); {_VP}: "
        "use --sampler dpmpp_2m --schedule karras"
    ),
    "CosineDPMSolverMultistepScheduler": (
        f"is for continuous-time EDM models (Stable Audio) and draws its noise from a "
        f"Brownian tree; {_VP}: use --sampler dpmpp_2m_sde"
    ),
    "IPNDMScheduler": (
        "brings its own continuous-time noise schedule (timesteps in [0, 1]) instead of the "
        f"model's training one; {_VP}"
    ),
    "DPMSolverSDEScheduler": (
        "draws its noise from a Brownian tree seeded once per batch, so a sample would "
        "change with its batch and from run to run; use --sampler dpmpp_sde, the same "
        "solver with per-sample noise"
    ),
    "DDIMInverseScheduler": (
        "runs the diffusion backwards (image to noise, for inversion) and does not "
        "generate: use DDIMScheduler"
    ),
    "DPMSolverMultistepInverseScheduler": (
        "runs the diffusion backwards (image to noise, for inversion) and does not "
        "generate: use DPMSolverMultistepScheduler"
    ),
    "AmusedScheduler": _TOKENS,
    "VQDiffusionScheduler": _TOKENS,
    "BlockRefinementScheduler": _TOKENS,
    "DiscreteDDIMScheduler": _TOKENS,
    "EntropyBoundScheduler": _TOKENS,
    "RePaintScheduler": "is for inpainting: its step needs the original image and a mask",
    "UnCLIPScheduler": (
        "is the unCLIP (Karlo) pipeline's DDPM variant (squaredcos_cap_v2 only): use DDPMScheduler"
    ),
    "CogVideoXDDIMScheduler": (
        "is CogVideoX's: it shifts the training schedule's SNR (snr_shift_scale), so its "
        "noise levels are not the model's: use DDIMScheduler"
    ),
    "CogVideoXDPMScheduler": (
        "is CogVideoX's: its step needs the previous step's output and timestep: "
        "use DPMSolverMultistepScheduler"
    ),
    "DDPMWuerstchenScheduler": (
        f"is Wuerstchen's prior scheduler, with its own continuous-time schedule; {_VP}"
    ),
}

#: Options the model fixes (read from its scheduler config), not the user.
_MODEL_OPTIONS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
    "prediction_type",
    "shift",
)
#: Options that turn a scheduler into a rectified-flow one.
_FLOW_OPTIONS = ("use_flow_sigmas", "flow_shift", "shift_terminal", "use_dynamic_shifting")


class DiffusersScheduler:
    """A ``diffusers`` scheduler class, by name (default: the model's own), with its
    config options."""

    name = "diffusers"

    def __init__(self, scheduler: str | None = None, **config: Any) -> None:
        for key in config:
            if key in _MODEL_OPTIONS:
                raise OptionError(
                    f"diffusers sampler: {key} is the model's, read from its scheduler config; "
                    "it cannot be set"
                )
            if key in _FLOW_OPTIONS:
                raise OptionError(f"diffusers sampler: {key} is for rectified-flow models; {_VP}")
        self.scheduler_class = None if scheduler is None else scheduler_class(scheduler)
        if self.scheduler_class is not None:
            _check_options(self.scheduler_class, config)
        self.config = config

    def resolve_class(self, denoise: Any) -> type:
        """The scheduler class to run: the one asked for, else the one the model's scheduler
        config names, else DDIM."""
        if self.scheduler_class is not None:
            return self.scheduler_class
        name = (getattr(denoise, "scheduler_config", None) or {}).get("_class_name")
        why = why_not(name or "DDIMScheduler")
        if why is not None:
            raise OptionError(
                f"the model's scheduler config names {name}, which {why}; choose a scheduler "
                "with --sampler-option scheduler=NAME"
            )
        cls = scheduler_class(name or "DDIMScheduler")
        _check_options(cls, self.config)
        return cls

    def make_scheduler(self, denoise: Any) -> Any:
        cls = self.resolve_class(denoise)
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
        accepted = _config_options(cls)
        config = {k: v for k, v in base.items() if k in accepted}
        config.update(self.config)
        # The denoiser already returns x0; we hand the scheduler epsilon.
        config["prediction_type"] = "epsilon"
        _check_config(cls.__name__, config)
        try:
            return cls.from_config(config)
        except (ValueError, NotImplementedError) as exc:
            raise OptionError(f"{cls.__name__}: {_one_line(exc)}") from None

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
        if getattr(levels, "is_flow", False):
            return self._flow(denoise, x, sigma_list(sigmas), noise, callback)
        if levels is None or levels.sigmas is None:
            self.resolve_class(denoise)  # a model's own scheduler is refused with its reason
            raise DtkError("the diffusers sampler needs a discrete-time model")
        sigmas = sigma_list(sigmas)
        scheduler = self.make_scheduler(denoise)
        _check_noise_levels(scheduler, levels)
        try:
            scheduler.set_timesteps(len(sigmas) - 1, device=x.device)
        except (ValueError, NotImplementedError) as exc:
            name = type(scheduler).__name__
            raise OptionError(f"{name} with {len(sigmas) - 1} steps: {_one_line(exc)}") from None
        final_step = _FinalStep.of(scheduler)
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
            if i + 1 == len(timesteps):
                sample = final_step(scheduler, sample)
            report(callback, i, sample, sigma, sigma, denoised)
        return sample

    def _flow(self, denoise: Denoiser, x: torch.Tensor, sigmas: list[float],
              noise: NoiseSource, callback: StepCallback | None) -> torch.Tensor:  # fmt: skip
        """A rectified-flow model's own scheduler on ``x_t = x / (1 + sigma)``, handed the
        velocity ``(x_t - x0) / t``; the engine took its first step from ``t = 1``."""
        scheduler = self._flow_scheduler(denoise)
        levels = denoise.noise_levels
        times = {} if levels.mu is None else {"mu": levels.mu}
        # the engine's first step plus the len(sigmas) - 1 left: --steps in all
        steps = len(sigmas)
        if getattr(levels, "spacing", "euler") == "uniform":  # the times FluxPipeline hands it
            import numpy as np

            times["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        try:
            scheduler.set_timesteps(steps, device=x.device, **times)
        except (ValueError, NotImplementedError) as exc:
            name = type(scheduler).__name__
            raise OptionError(f"{name} with {len(sigmas)} steps: {_one_line(exc)}") from None
        times = [float(t) for t in scheduler.sigmas]
        reached = sigmas[0] / (1 + sigmas[0])
        if times[0] != 1.0 or not math.isclose(times[1], reached, rel_tol=1e-5, abs_tol=1e-7):
            raise OptionError(
                f"{type(scheduler).__name__} steps from t = {times[0]:.4g} to t = "
                f"{times[1]:.4g}, but this run's first step reached t = {reached:.4g}: run "
                "it with --schedule flow and no options changing its times"
            )
        sample = x / (1 + sigmas[0])
        timesteps = list(scheduler.timesteps)
        for i in range(1, len(timesteps)):
            t, t_next = times[i], times[i + 1]
            sigma, sigma_next = t / (1 - t), t_next / (1 - t_next)
            denoised = denoise(sample * (1 + sigma), sigma)
            velocity = (sample - denoised) / t
            with _noise_from(scheduler, noise, sigma, sigma_next):
                sample = scheduler.step(velocity, timesteps[i], sample, return_dict=False)[0]
            report(callback, i - 1, sample * (1 + sigma_next), sigma, sigma, denoised)
        return sample

    def _flow_scheduler(self, denoise: Any) -> Any:
        name = (getattr(denoise, "scheduler_config", None) or {}).get("_class_name")
        if self.scheduler_class is not None or name not in FLOW_SUPPORTED:
            asked = name if self.scheduler_class is None else self.scheduler_class.__name__
            raise OptionError(
                f"{asked} is not a rectified-flow scheduler the diffusers sampler runs; this "
                f"is a rectified-flow model: it runs the model's own "
                f"{' or '.join(sorted(FLOW_SUPPORTED))} (leave scheduler= out)"
            )
        import diffusers

        cls = getattr(diffusers, name)
        _check_options(cls, self.config)
        if self.config.get("stochastic_sampling"):
            raise OptionError(f"{name} with stochastic_sampling draws its first step's noise "
                              "afresh; the run's first step keeps the start's")  # fmt: skip
        accepted = _config_options(cls)
        config = {k: v for k, v in denoise.scheduler_config.items() if k in accepted}
        try:
            return cls.from_config({**config, **self.config})
        except (ValueError, NotImplementedError) as exc:
            raise OptionError(f"{name}: {_one_line(exc)}") from None


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class `name`, if the adapter runs it; else an `OptionError`
    with one line saying why not."""
    import diffusers

    why = why_not(name)
    if why is None:
        return getattr(diffusers, name)
    if name in REFUSED:
        raise OptionError(f"{name} {why}")
    choices = ", ".join(n for n in sorted(SUPPORTED) if why_not(n) is None)
    if isinstance(getattr(diffusers, name, None), type):
        raise OptionError(f"{name} {why}; it runs: {choices}")
    raise OptionError(f"diffusers has no scheduler {name!r}; choose one of: {choices}")


def why_not(name: str) -> str | None:
    """Why the adapter does not run scheduler class `name` (completes "NAME ..."), or None
    if it does."""
    import diffusers

    if name in REFUSED:
        return REFUSED[name]
    cls = getattr(diffusers, name, None)
    if name not in SUPPORTED:
        if isinstance(cls, type):
            return (
                "has not been checked with the diffusers sampler (discrete-time VP schedulers "
                "with per-sample noise)"
            )
        return "is not a diffusers scheduler"
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        return f"is not in the installed diffusers ({diffusers.__version__})"
    return None


class _FinalStep:
    """What the adapter does after a scheduler's last step (nothing, for most).

    diffusers' UniPC with ``solver_type="bh1"`` returns NaN on its last step when that step
    goes to sigma 0 (``final_sigmas_type="zero"``, the default): its predictor computes
    ``x' = sigma'/sigma x - alpha' expm1(-h) m0 - alpha' B(h) r`` with ``B(h) = -h`` and
    ``h = lambda' - lambda = inf``, and a first-order step has no residual ``r = 0``, so
    it adds ``-inf * 0 = NaN``. The step's exact value is ``m0``, the data prediction it
    has just stored (``sigma' = 0``, ``alpha' = 1``, ``expm1(-inf) = -1``), which is what
    ``bh2`` (``B(h) = expm1(-h) = -1``) returns there; that value is restored here.

    Two more configurations have no finite last step to sigma 0 in either variant, and are
    refused before sampling: a last step of order > 1 (``lower_order_final=False``), whose
    differences ``D_k = (m_k - m0) / r_k`` divide by ``r_k = (lambda_k - lambda) / h = 0``,
    and noise-predicting UniPC (``predict_x0=False``), which multiplies ``sigma' = 0`` by
    ``expm1(h) = inf``.
    """

    @staticmethod
    def of(scheduler: Any) -> Any:
        config = scheduler.config
        if type(scheduler).__name__ != "UniPCMultistepScheduler":
            return _FinalStep.keep
        if config.get("final_sigmas_type", "zero") != "zero":
            return _FinalStep.keep
        if not config.get("predict_x0", True):
            raise OptionError(
                "UniPCMultistepScheduler with predict_x0=false cannot step to sigma 0 "
                "(0 * inf); use final_sigmas_type=sigma_min or predict_x0=true"
            )
        if config.get("solver_order", 2) > 1 and not config.get("lower_order_final", True):
            raise OptionError(
                "UniPCMultistepScheduler with lower_order_final=false has no finite last step "
                "to sigma 0 (its ratios r_k = (lambda_k - lambda) / h are 0 there); use "
                "lower_order_final=true or final_sigmas_type=sigma_min"
            )
        if config.get("solver_type") != "bh1":
            return _FinalStep.keep
        return _FinalStep.data_prediction

    @staticmethod
    def keep(scheduler: Any, sample: torch.Tensor) -> torch.Tensor:
        return sample

    @staticmethod
    def data_prediction(scheduler: Any, sample: torch.Tensor) -> torch.Tensor:
        return scheduler.model_outputs[-1].to(sample.dtype)


def _config_options(cls: type) -> set[str]:
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _check_options(cls: type, config: Mapping[str, Any]) -> None:
    accepted = _config_options(cls)
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise OptionError(
            f"{cls.__name__} has no config option {unknown[0]!r}; its options: "
            f"{', '.join(sorted(accepted - set(_MODEL_OPTIONS) - set(_FLOW_OPTIONS)))}"
        )


def _check_config(name: str, config: Mapping[str, Any]) -> None:
    """Refuse configurations (the model's merged with the user's) that cannot run here."""
    if config.get("use_flow_sigmas") or config.get("use_dynamic_shifting"):
        raise OptionError(f"{name} with flow sigmas is for rectified-flow models; {_VP}")
    variance = config.get("variance_type")
    if variance in ("learned", "learned_range") and name.startswith("DDPM"):
        raise OptionError(
            f"{name} with variance_type={variance} needs the model's predicted variance, and "
            "the diffusers sampler hands the scheduler epsilon only: use --sampler ddpm, "
            "which samples with it"
        )


def _check_noise_levels(scheduler: Any, levels: Any) -> None:
    """The scheduler must step through the model's own training noise levels."""
    import torch

    ours = levels.alphas_cumprod.double()
    theirs = getattr(scheduler, "alphas_cumprod", None)
    if theirs is None:
        return
    theirs = torch.as_tensor(theirs).double().cpu()
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-4, atol=1e-7):
        raise DtkError(
            f"{type(scheduler).__name__}'s training noise levels differ from the model's; "
            "the diffusers sampler runs a scheduler on the model's own levels"
        )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


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
