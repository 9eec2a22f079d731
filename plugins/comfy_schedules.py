"""ComfyUI's schedulers, by their ComfyUI names: ``simple``, ``sgm_uniform``, ``normal``,
``ddim_uniform``, ``linear_quadratic`` and ``kl_optimal`` (ComfyUI's ``comfy/samplers.py``;
``karras``, ``exponential`` and ``beta`` are the toolkit's own, in ``plugins/schedules.py``),
and the published tables of its ``GITSScheduler`` and ``OptimalStepsScheduler`` nodes as
``gits`` and ``optimal_steps`` (the tables in ``plugins/schedule_tables.py``).

ComfyUI defines them on its "model sampling": a table of the model's training noise levels
in index order and two maps between a noise level and a (fractional) timestep. `ModelTable`
is that table for our two kinds of discrete-time model:

* a VP model (DDPM-trained, SD 1.x/2.x, SDXL, ...): the ``T`` training sigmas; a timestep's
  sigma is interpolated linearly in log sigma between the integer timesteps around it, and
  a sigma's timestep is the index of the nearest training sigma in log sigma;
* a rectified-flow model (SD 3, Flux): ComfyUI's "sigmas" are the times ``t`` themselves,
  ``shifted(i / T)`` for ``i = 1 .. T``; a timestep ``s`` is the time ``shifted(s / T)``
  and a time's timestep ``t T``. The schedules run on those times, which then become our
  sigmas ``t / (1 - t)`` (``t = 1``: sigma = inf, the engine's exact first step).

The formulas are ComfyUI's, computed in float64 (ComfyUI keeps float32); each class cites
its source. What ComfyUI returns is kept as it is, including ``ddim_uniform``'s count of
steps, which is ComfyUI's (one more than asked for when ``T`` is not a multiple of it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any, Literal

import toolkit
from plugins.schedule_tables import GITS_LEVELS, OPTIMAL_STEPS_LEVELS
from plugins.schedules import _check_steps, _finish, loglinear_interp
from toolkit import DtkError, OptionError, lazy_import

if TYPE_CHECKING:
    import numpy as np
    import torch

    from toolkit import NoiseLevels
else:
    np = lazy_import("numpy")
    torch = lazy_import("torch")


@dataclasses.dataclass(frozen=True)
class ModelTable:
    """A model's training noise levels as ComfyUI's model sampling holds them (see the
    module docstring): `levels` in index order (VP: sigmas; flow: times `t`)."""

    levels: np.ndarray
    flow: bool
    #: a flow model's time shift (`FlowLevels.shifted`)
    shifted: Any = None

    @classmethod
    def of(cls, name: str, noise: NoiseLevels) -> ModelTable:
        if getattr(noise, "is_flow", False):
            n = noise.num_train_timesteps
            times = np.asarray(noise.shifted(np.arange(1, n + 1, dtype=np.float64) / n))
            return cls(times, True, noise.shifted)
        if noise.sigmas is None:
            raise DtkError(f"schedule {name!r} (ComfyUI's) reads a model's discrete training "
                           "noise levels; this model is continuous-time: use karras, "
                           "exponential or polyexponential")  # fmt: skip
        return cls(noise.sigmas.double().numpy(), False)

    @functools.cached_property
    def log_levels(self) -> np.ndarray:
        """The levels' logarithms, which every ``level`` and ``timestep`` of a VP table reads."""
        return np.log(self.levels)

    @property
    def count(self) -> int:
        return len(self.levels)

    @property
    def low(self) -> float:
        """ComfyUI's ``sigma_min``: the first level."""
        return float(self.levels[0])

    @property
    def high(self) -> float:
        """ComfyUI's ``sigma_max``: the last level."""
        return float(self.levels[-1])

    def level(self, timestep: float) -> float:
        """The noise level of a fractional `timestep` (ComfyUI's ``sigma(timestep)``)."""
        if self.flow:
            return float(self.shifted(timestep / self.count))
        t = min(max(float(timestep), 0.0), self.count - 1.0)
        low, high = math.floor(t), math.ceil(t)
        weight = t - low
        log = self.log_levels
        return float(np.exp((1 - weight) * log[low] + weight * log[high]))

    def timestep(self, level: float) -> float:
        """The timestep of a noise `level` (ComfyUI's ``timestep(sigma)``)."""
        if self.flow:
            return level * self.count
        return float(np.abs(math.log(level) - self.log_levels).argmin())

    def finish(self, name: str, levels: list[float] | np.ndarray) -> torch.Tensor:
        """ComfyUI's levels (without their final 0) as our sigmas ending in 0."""
        if self.flow:
            return _finish(name, flow_sigmas(levels))
        return _finish(name, np.asarray(levels, dtype=np.float64))


def flow_sigmas(times: list[float] | np.ndarray) -> np.ndarray:
    """A flow model's times ``t`` (ComfyUI's "sigmas" of it) as our ``sigma = t / (1 - t)``,
    ``t = 1`` being ``sigma = inf``."""
    times = np.asarray(times, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(times >= 1, math.inf, times / (1 - times))


class Simple:
    """ComfyUI's ``simple``: `steps` training levels taken evenly by index from the top,
    ``levels[-(1 + floor(i T / steps))]`` (ComfyUI ``simple_scheduler``). On a flow model
    it is the model's own spacing (as diffusers' ``FlowMatchEulerDiscreteScheduler`` up to
    where the times fall between training times)."""

    name = "simple"

    def __call__(self, steps: int, noise: NoiseLevels) -> torch.Tensor:
        _check_steps(self.name, steps)
        table = ModelTable.of(self.name, noise)
        stride = table.count / steps
        return table.finish(self.name, [table.levels[-(1 + int(i * stride))]
                                        for i in range(steps)])  # fmt: skip


class Normal:
    """ComfyUI's ``normal``: `steps` timesteps evenly spaced from that of the highest level
    to that of the lowest, each at its (interpolated) level, then 0 (ComfyUI
    ``normal_scheduler``; its branch for a lowest level of 0 never applies here: a discrete
    model's lowest level is its first training one, about 0.03 for SD)."""

    name = "normal"
    sgm = False

    def __call__(self, steps: int, noise: NoiseLevels) -> torch.Tensor:
        _check_steps(self.name, steps)
        table = ModelTable.of(self.name, noise)
        start, end = table.timestep(table.high), table.timestep(table.low)
        if self.sgm:
            timesteps = np.linspace(start, end, steps + 1)[:-1]
        else:
            timesteps = np.linspace(start, end, steps)
        return table.finish(self.name, [table.level(t) for t in timesteps])


class SGMUniform(Normal):
    """ComfyUI's ``sgm_uniform`` (Stability's "sgm" sampling code): as ``normal`` with
    ``steps + 1`` timesteps, the last dropped, so the final step goes to 0 from one interval
    above the lowest level (ComfyUI ``normal_scheduler(sgm=True)``)."""

    name = "sgm_uniform"
    sgm = True


class DDIMUniform:
    """ComfyUI's ``ddim_uniform``: every ``T // steps``-th training level from index 1 up,
    reversed, then 0; the count of steps is ComfyUI's, ``ceil((T - 1) / (T // steps))``:
    one more than asked for when ``T`` is not a multiple of `steps` (ComfyUI
    ``ddim_scheduler``; its branch for a level of 0 at index 1 never applies here)."""

    name = "ddim_uniform"

    def __call__(self, steps: int, noise: NoiseLevels) -> torch.Tensor:
        _check_steps(self.name, steps)
        table = ModelTable.of(self.name, noise)
        stride = max(table.count // steps, 1)
        return table.finish(self.name, table.levels[1::stride][::-1])


class LinearQuadratic:
    """ComfyUI's ``linear_quadratic`` (from Genmo's Mochi, ``infer.py``): a fraction
    ``1 - s`` of the highest level, ``s`` linear from 0 to `threshold_noise` over the first
    `linear_steps` (default half the steps), then quadratic to 1 (ComfyUI
    ``linear_quadratic_schedule``). Made for flow models, whose highest level is ``t = 1``."""

    name = "linear_quadratic"

    def __init__(self, threshold_noise: float = 0.025, linear_steps: int | None = None) -> None:
        if not 0 < threshold_noise < 1:
            raise DtkError("linear_quadratic: threshold_noise must be in (0, 1)")
        if linear_steps is not None and linear_steps < 1:
            raise DtkError("linear_quadratic: linear_steps must be at least 1")
        self.threshold_noise, self.linear_steps = threshold_noise, linear_steps

    def __call__(self, steps: int, noise: NoiseLevels) -> torch.Tensor:
        _check_steps(self.name, steps)
        table = ModelTable.of(self.name, noise)
        if steps == 1:
            return table.finish(self.name, [table.high])
        linear = self.linear_steps if self.linear_steps is not None else steps // 2
        if linear >= steps:
            raise DtkError(f"linear_quadratic: linear_steps ({linear}) must be fewer than "
                           f"the steps ({steps})")  # fmt: skip
        threshold = self.threshold_noise
        ramp = [i * threshold / linear for i in range(linear)]
        rest = steps - linear
        diff = linear - threshold * steps
        quadratic = diff / (linear * rest**2)
        slope = threshold / linear - 2 * diff / rest**2
        const = quadratic * linear**2
        ramp += [quadratic * i**2 + slope * i + const for i in range(linear, steps)]
        return table.finish(self.name, [(1 - s) * table.high for s in ramp])


class KLOptimal:
    """ComfyUI's ``kl_optimal`` (Sabour et al. 2024, "Align Your Steps", the KL-optimal
    schedule of its appendix; AUTOMATIC1111 PR #15608): ``tan`` of levels evenly spaced in
    ``arctan`` from the highest training level to the lowest (ComfyUI
    ``kl_optimal_scheduler``)."""

    name = "kl_optimal"

    def __call__(self, steps: int, noise: NoiseLevels) -> torch.Tensor:
        _check_steps(self.name, steps)
        table = ModelTable.of(self.name, noise)
        ramp = np.arange(steps, dtype=np.float64) / max(steps - 1, 1)
        angles = ramp * math.atan(table.low) + (1 - ramp) * math.atan(table.high)
        return table.finish(self.name, np.tan(angles))


class GITS:
    """GITS (Chen et al. 2024, "On the Trajectory Regularity of ODE-based Diffusion
    Sampling"), as ComfyUI's ``GITSScheduler`` node (``comfy_extras/nodes_gits.py``): the
    published levels for `coeff` (0.80 .. 1.50 by 0.05) and 2 .. 20 steps; for more steps
    the 20-step levels interpolated in log sigma to ``steps + 1``; the last level (SD 1.5's
    lowest, 0.0292) then replaced by 0. The levels are SD 1.5's sigmas, taken as they are
    whatever the model, as the node does; a rectified-flow model is refused (ComfyUI's
    "sigmas" of it are times in (0, 1]). The node's ``denoise`` (the last part of the
    schedule) has no counterpart here."""

    name = "gits"

    def __init__(self, coeff: float = 1.20) -> None:
        if round(coeff, 2) not in GITS_LEVELS:
            raise OptionError(f"gits: coeff must be one of 0.80, 0.85, ..., 1.50 (the published "
                              f"tables), got {coeff!r}")  # fmt: skip
        self.coeff = coeff

    def __call__(self, steps: int, noise: NoiseLevels) -> torch.Tensor:
        _check_steps(self.name, steps)
        if steps < 2:
            raise DtkError("schedule 'gits' needs at least 2 steps (its tables start at 2)")
        if getattr(noise, "is_flow", False):
            raise DtkError("schedule 'gits' holds SD 1.5-style VP sigmas; this is a "
                           "rectified-flow model: use optimal_steps or flow")  # fmt: skip
        rows = GITS_LEVELS[round(self.coeff, 2)]
        if steps - 2 < len(rows):
            levels = np.asarray(rows[steps - 2], dtype=np.float64)
        else:
            levels = loglinear_interp(rows[-1], steps + 1)
        return _finish(self.name, levels[:-1])


class OptimalSteps:
    """Optimal Stepsize for Diffusion Sampling (Pei et al. 2025), as ComfyUI's
    ``OptimalStepsScheduler`` node (``comfy_extras/nodes_optimalsteps.py``): `model`'s
    published times (``flux``: 10 steps, ``wan``: 20, ``chroma``: 40), interpolated in
    ``log t`` to ``steps + 1`` when `steps` differs, the last (0.001) replaced by 0. The
    node hands the times to ComfyUI as a flow model's "sigmas", which are times ``t``; they
    become our ``sigma = t / (1 - t)`` (Wan's ``t = 1``: sigma = inf), as every flow schedule
    of ComfyUI's here. Like the node it ignores the model's shift: the times are final.
    Rectified-flow models only; the node's ``denoise`` has no counterpart here."""

    name = "optimal_steps"

    def __init__(self, model: Literal["flux", "wan", "chroma"] = "flux") -> None:
        if model not in OPTIMAL_STEPS_LEVELS:
            raise OptionError(f"optimal_steps: model must be one of "
                              f"{', '.join(OPTIMAL_STEPS_LEVELS)}, got {model!r}")  # fmt: skip
        self.model = model

    def times(self, steps: int) -> np.ndarray:
        """The node's ``steps + 1`` times, ending in 0."""
        published = OPTIMAL_STEPS_LEVELS[self.model]
        if steps + 1 == len(published):
            times = np.asarray(published, dtype=np.float64)
        else:
            times = loglinear_interp(published, steps + 1)
        times[-1] = 0.0
        return times

    def __call__(self, steps: int, noise: NoiseLevels) -> torch.Tensor:
        _check_steps(self.name, steps)
        if not getattr(noise, "is_flow", False):
            raise DtkError("schedule 'optimal_steps' holds times of rectified-flow models "
                           "(Flux, Wan, Chroma); this is not one: use gits or "
                           "align_your_steps")  # fmt: skip
        return _finish(self.name, flow_sigmas(self.times(steps)[:-1]))


COMFY_SCHEDULES = (Simple, Normal, SGMUniform, DDIMUniform, LinearQuadratic, KLOptimal, GITS,
                   OptimalSteps)  # fmt: skip


@toolkit.hookimpl
def register_schedules(register: toolkit.Register) -> None:
    for schedule in COMFY_SCHEDULES:
        register(schedule)
