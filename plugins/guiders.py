"""Guidance methods equal to diffusers' guiders (``diffusers.guiders``): CFG-Zero*, adaptive
projected guidance, tangential CFG and frequency-decoupled guidance.

Each combines a conditional and an unconditional prediction, but not affinely (a projection,
an optimised scale, an SVD, a frequency split), so the result depends on what is combined.
diffusers' guiders act on the network's raw output (epsilon for SD, v for v-prediction
models, the velocity for rectified-flow ones); these ask the toolkit for the same with
``space = "output"`` (docs/plugins.md, register_guidance), and the same scheduler, seeds and
settings give the same images. ``space="denoised"`` combines the clean-image estimates
instead (what the APG paper's own algorithm guides).

Options keep the guiders' names and defaults, with ``scale`` for ``guidance_scale``
(``scales`` for FDG's per-level ones). diffusers' ``start``/``stop`` (fractions of the
steps, which a guidance here does not know) are left out: ``interval`` shows how a guidance
limits itself to noise levels. Where diffusers counts steps (CFG-Zero*'s zero-init, APG's
momentum reset), a step is a noise level the sampler visits: one per step for the samplers
that evaluate the model once per step (``euler``, ``ddim``, ``dpmpp_2m``); the state is per
sampling run (`start_batch`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import toolkit
from plugins.guidance import check_finite, rescale_cfg
from toolkit import DtkError, OptionError, lazy_import

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")

COND, UNCOND = "cond", "uncond"
SPACES = ("output", "denoised")


def project(v0: torch.Tensor, v1: torch.Tensor, dims: Sequence[int], upcast: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(parallel, orthogonal) parts of `v0` against `v1`, per sample over `dims`, in float64
    with `upcast` (on CPU where the device has none), as diffusers' guiders do."""
    dtype, device = v0.dtype, v0.device
    if upcast:
        # diffusers falls back to the CPU where float64 is missing
        cpu = device.type in ("mps", "npu")
        v0, v1 = (v0.cpu(), v1.cpu()) if cpu else (v0, v1)
        v0, v1 = v0.double(), v1.double()
    v1 = torch.nn.functional.normalize(v1, dim=list(dims))
    parallel = (v0 * v1).sum(dim=list(dims), keepdim=True) * v1
    orthogonal = v0 - parallel
    return parallel.to(device, dtype), orthogonal.to(device, dtype)


class RunSteps:
    """The step a guidance call belongs to within one sampling run: the run starts at
    `reset` (`start_batch`) or, for callers that never call that, at the first call and
    whenever sigma rises or the batch shape changes; a step is a new noise level."""

    def __init__(self) -> None:
        self.started = False  # whether runs are started by `reset` (from start_batch)
        self.reset()

    def reset(self) -> None:
        self.step, self.sigma, self.shape = 0, None, None

    def peek(self, sigma: float, shape: object = None) -> tuple[int, bool]:
        """(the step a call at `sigma` on samples of `shape` would belong to, whether it
        would start a run); a `shape` of None: the last call's."""
        shape = self.shape if shape is None else shape
        if self.sigma is None or shape != self.shape:
            return 0, True
        if sigma > self.sigma and not self.started:
            return 0, True
        return self.step + (sigma != self.sigma), False

    def __call__(self, sigma: float, shape: object) -> tuple[int, bool]:
        """(this call's step, whether it starts a run)."""
        step, new_run = self.peek(sigma, shape)
        self.step, self.sigma, self.shape = step, sigma, shape
        return step, new_run


class Guider:
    """What the four share: the ``cond``/``uncond`` branches, `space`, the final
    ``guidance_rescale``, ``use_original_formulation`` (guide from the conditional
    prediction, ``c + s (c - u)``, rather than ``u + s (c - u)``) and skipping guidance, and
    the unconditional pass with it, where diffusers does (`enabled`)."""

    name: str
    branches = (COND, UNCOND)

    def _options(self, final_rescale: float, use_original_formulation: bool,
                 space: str) -> None:  # fmt: skip
        if space not in SPACES:
            raise OptionError(f"{self.name}: space must be 'output' or 'denoised'")
        self._final_rescale = final_rescale
        self.use_original_formulation = use_original_formulation
        self.space = space
        # the scale at which guiding gives the conditional prediction back
        self._identity = 0.0 if use_original_formulation else 1.0

    @property
    def enabled(self) -> bool:
        raise NotImplementedError

    def active(self, sigma: float) -> tuple[str, ...]:
        return self.branches if self.enabled else (COND,)

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, preds: Mapping[str, torch.Tensor], sigma: float) -> torch.Tensor:
        cond = preds[COND]
        if UNCOND not in preds or not self.enabled:
            return cond  # rescaling the conditional prediction to itself changes nothing
        guided = self.combine(cond, preds[UNCOND])
        if self._final_rescale > 0:
            guided = rescale_cfg(guided, cond, self._final_rescale)
        return guided


def _check_rescale(name: str, rescale: float) -> None:
    if not 0 <= rescale <= 1:
        raise OptionError(f"{name}: guidance_rescale must be in [0, 1]")


class ScaledGuider(Guider):
    """A `Guider` with one guidance `scale`."""

    def __init__(self, scale: float, guidance_rescale: float, use_original_formulation: bool,
                 space: str) -> None:  # fmt: skip
        check_finite(self.name, scale=scale)
        _check_rescale(self.name, guidance_rescale)
        self.scale, self.guidance_rescale = scale, guidance_rescale
        self._options(guidance_rescale, use_original_formulation, space)

    @property
    def enabled(self) -> bool:
        return not math.isclose(self.scale, self._identity)

    def shift(self, cond: torch.Tensor, uncond: torch.Tensor, update: torch.Tensor
              ) -> torch.Tensor:  # fmt: skip
        """``u + scale * update`` (or from ``c`` with ``use_original_formulation``)."""
        return (cond if self.use_original_formulation else uncond) + self.scale * update


class CFGZeroStar(ScaledGuider):
    """CFG-Zero* (Fan et al. 2025, "CFG-Zero*: Improved Classifier-Free Guidance for Flow
    Matching Models"); diffusers' ``ClassifierFreeZeroStarGuidance``.

    The unconditional prediction is first scaled by the per-sample optimal ``s* = <c, u> /
    |u|^2``, then CFG at `scale`; with `use_zero_init` the first `zero_init_steps` steps'
    prediction is zero (sec. 4.2: an early velocity estimate is worse than none; for an
    epsilon model, zero noise leaves the step's estimate at x).
    """

    name = "cfg_zero_star"

    def __init__(
        self,
        scale: float = 7.5,
        zero_init_steps: int = 1,
        use_zero_init: bool = True,
        guidance_rescale: float = 0.0,
        use_original_formulation: bool = False,
        space: Literal["output", "denoised"] = "output",
    ) -> None:
        super().__init__(scale, guidance_rescale, use_original_formulation, space)
        if zero_init_steps < 0:
            raise OptionError(f"{self.name}: zero_init_steps must be at least 0")
        self.zero_init_steps, self.use_zero_init = zero_init_steps, use_zero_init
        self._zeroed = zero_init_steps if use_zero_init else 0
        self._steps = RunSteps()

    def start_batch(self, conditions: object) -> None:
        """A new sampling run: the zero-init steps count from here."""
        self._steps.reset()
        self._steps.started = True

    def active(self, sigma: float) -> tuple[str, ...]:
        if self._steps.peek(sigma)[0] < self._zeroed:
            return (COND,)  # its prediction is replaced by zeros: no unconditional pass
        return super().active(sigma)

    def __call__(self, preds: Mapping[str, torch.Tensor], sigma: float) -> torch.Tensor:
        step, _ = self._steps(sigma, tuple(preds[COND].shape))
        if step < self._zeroed:
            # diffusers would rescale these zeros too, to NaN (0 / std 0); zeros it is
            return torch.zeros_like(preds[COND])
        return super().__call__(preds, sigma)

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        flat_c, flat_u = cond.flatten(1).float(), uncond.flatten(1).float()
        alpha = (flat_c * flat_u).sum(1, keepdim=True) / ((flat_u**2).sum(1, keepdim=True) + 1e-8)
        uncond = uncond * alpha.to(cond.dtype).view(-1, *(1,) * (cond.ndim - 1))
        return self.shift(cond, uncond, cond - uncond)


class AdaptiveProjectedGuidance(ScaledGuider):
    """Adaptive projected guidance (Sadat et al. 2025, "Eliminating Oversaturation and
    Artifacts of High Guidance Scales in Diffusion Models"); diffusers'
    ``AdaptiveProjectedGuidance``.

    The CFG update ``c - u``, optionally with `momentum` (``m = update + momentum * m``,
    per step; the paper uses a negative one), its norm clipped to `norm_threshold` (0: no
    clipping; diffusers' ``adaptive_projected_guidance_rescale``), has its part parallel to
    ``c`` scaled by `eta` (0 drops it, the paper's choice; 1 keeps CFG's). Norms and
    projections are per sample over `norm_dim` (default: all but the batch dimension).
    """

    name = "apg"

    def __init__(
        self,
        scale: float = 7.5,
        eta: float = 1.0,
        norm_threshold: float = 15.0,
        momentum: float | None = None,
        norm_dim: int | tuple[int, ...] | None = None,
        guidance_rescale: float = 0.0,
        use_original_formulation: bool = False,
        space: Literal["output", "denoised"] = "output",
    ) -> None:
        super().__init__(scale, guidance_rescale, use_original_formulation, space)
        check_finite(self.name, eta=eta)
        if not (math.isfinite(norm_threshold) and norm_threshold >= 0):
            raise OptionError(f"{self.name}: norm_threshold must be a finite number >= 0")
        if momentum is not None:
            check_finite(self.name, momentum=momentum)
        dims = (norm_dim,) if isinstance(norm_dim, int) else norm_dim
        if dims is not None and (not dims or 0 in dims):
            raise OptionError(f"{self.name}: norm_dim must name sample dimensions (1, 2, ...; "
                              "-1 for the last), never the batch's 0")  # fmt: skip
        self.eta, self.norm_threshold, self.momentum = eta, norm_threshold, momentum
        self.norm_dim = norm_dim
        self._dims = None if dims is None else tuple(dims)
        self._steps = RunSteps()
        self._average: torch.Tensor | None = None

    def start_batch(self, conditions: object) -> None:
        """A new sampling run: the momentum starts afresh."""
        self._steps.reset()
        self._steps.started = True
        self._average = None

    def _norm_dims(self, ndim: int) -> list[int]:
        if self._dims is None:
            return [-i for i in range(1, ndim)]
        if not all(-ndim < d < ndim and d % ndim for d in self._dims):
            raise DtkError(f"{self.name}: norm_dim {self.norm_dim} does not name sample "
                           f"dimensions of {ndim}-d predictions (1 to {ndim - 1}, or "
                           "negative)")  # fmt: skip
        return list(self._dims)

    def __call__(self, preds: Mapping[str, torch.Tensor], sigma: float) -> torch.Tensor:
        _, new_run = self._steps(sigma, tuple(preds[COND].shape))
        if new_run:  # diffusers' new MomentumBuffer at step 0
            self._average = None
        return super().__call__(preds, sigma)

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        dims = self._norm_dims(cond.ndim)
        update = cond - uncond
        if self.momentum is not None:
            previous = 0 if self._average is None else self._average
            self._average = update + self.momentum * previous
            update = self._average
        if self.norm_threshold > 0:
            norm = update.norm(p=2, dim=dims, keepdim=True)
            update = update * torch.minimum(torch.ones_like(update), self.norm_threshold / norm)
        parallel, orthogonal = project(update, cond, dims)
        return self.shift(cond, uncond, orthogonal + self.eta * parallel)


class TangentialCFG(ScaledGuider):
    """Tangential classifier-free guidance (Kwon et al. 2025, "TCFG: Tangential Damping
    Classifier-free Guidance"); diffusers' ``TangentialClassifierFreeGuidance``.

    Per sample, the SVD of the stacked ``[c, u]`` gives the two directions they span; the
    unconditional prediction keeps only its component along the first (dominant) one before
    CFG at `scale`, which damps its tangential part.
    """

    name = "tcfg"

    def __init__(
        self,
        scale: float = 7.5,
        guidance_rescale: float = 0.0,
        use_original_formulation: bool = False,
        space: Literal["output", "denoised"] = "output",
    ) -> None:
        super().__init__(scale, guidance_rescale, use_original_formulation, space)

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack([cond, uncond], dim=1).float().flatten(2)  # [B, 2, N]
        _, _, vh = torch.linalg.svd(stacked, full_matrices=False)
        # the projection onto the dominant right-singular vector (blind to its sign)
        kept = vh.clone()
        kept[:, 1] = 0
        flat_u = uncond.reshape(uncond.shape[0], 1, -1).float()
        uncond = (flat_u @ vh.transpose(-2, -1) @ kept).reshape(cond.shape).to(cond.dtype)
        return self.shift(cond, uncond, cond - uncond)


# -- frequency-decoupled guidance ----------------------------------------------------------


def _blur(x: torch.Tensor) -> torch.Tensor:
    """kornia's pyramid blur: the 5x5 binomial kernel, per channel, reflected borders."""
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = (torch.outer(taps, taps) / 256.0).to(x.device, x.dtype)
    channels = x.shape[1]
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    return torch.nn.functional.conv2d(padded, kernel.expand(channels, 1, 5, 5), groups=channels)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _pyrdown(x: torch.Tensor) -> torch.Tensor:
    return _resize(_blur(x), (x.shape[-2] // 2, x.shape[-1] // 2))


def _pyrup(x: torch.Tensor) -> torch.Tensor:
    return _blur(_resize(x, (x.shape[-2] * 2, x.shape[-1] * 2)))


def _padding(height: int, width: int, levels: int) -> tuple[int, int]:
    """(bottom, right) reflect padding kornia's ``build_laplacian_pyramid`` adds: up to the
    next powers of two when neither side is one, or a side does not halve `levels - 1`
    times."""

    def power_of_two(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    stride = 1 << (levels - 1)
    if (power_of_two(height) or power_of_two(width)) and not (height % stride or width % stride):
        return 0, 0
    return (1 << (height - 1).bit_length()) - height, (1 << (width - 1).bit_length()) - width


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """kornia's ``build_laplacian_pyramid(x, levels)`` (what diffusers' FDG uses): band-pass
    levels from the finest, then the coarsest Gaussian level."""
    bottom, right = _padding(x.shape[-2], x.shape[-1], levels)
    if bottom or right:
        x = torch.nn.functional.pad(x, (0, right, 0, bottom), mode="reflect")
    gaussian = [x]
    for _ in range(levels - 1):
        gaussian.append(_pyrdown(gaussian[-1]))
    bands = [fine - _pyrup(coarse) for fine, coarse in itertools.pairwise(gaussian)]
    return [*bands, gaussian[-1]]


def from_pyramid(pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
    """The image of a Laplacian pyramid (diffusers' ``build_image_from_pyramid``)."""
    image = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        image = _pyrup(image) + band
    return image


def _per_level(name: str, what: str, value: float | Sequence[float], levels: int
               ) -> tuple[float, ...]:  # fmt: skip
    values = (value,) * levels if isinstance(value, (int, float)) else tuple(value)
    if len(values) != levels:
        raise OptionError(f"{name}: {what} needs one value or one per level of scales "
                          f"({levels}), got {len(values)}")  # fmt: skip
    return tuple(float(v) for v in values)


class FrequencyDecoupledGuidance(Guider):
    """Frequency-decoupled guidance (Sadat et al. 2025, "Guidance in the Frequency Domain
    Enables High-Fidelity Sampling at Low CFG Scales"); diffusers'
    ``FrequencyDecoupledGuidance``.

    Both predictions are split into a Laplacian pyramid of ``len(scales)`` levels; each
    level gets CFG at its own scale (`scales` from the highest frequencies to the lowest: the
    paper guides fine detail strongly and colour and layout gently), its update's part
    parallel to the conditional level weighted by `parallel_weights` (1: plain CFG), and the
    pyramid is put back together. `guidance_rescale` applies to the result (its first value)
    or, with ``guidance_rescale_space="freq"``, per level; `upcast_to_double` projects in
    float64. A sample whose sides are not divisible by ``2 ** (levels - 1)`` is padded for the
    pyramid, as kornia does, and cropped back (diffusers returns the padded size).
    """

    name = "fdg"

    def __init__(
        self,
        scales: tuple[float, ...] = (10.0, 5.0),
        parallel_weights: float | tuple[float, ...] | None = None,
        guidance_rescale: float | tuple[float, ...] = 0.0,
        guidance_rescale_space: Literal["data", "freq"] = "data",
        upcast_to_double: bool = True,
        use_original_formulation: bool = False,
        space: Literal["output", "denoised"] = "output",
    ) -> None:
        scales = tuple(float(s) for s in scales)
        if not scales:
            raise OptionError(f"{self.name}: scales needs at least one level")
        for scale in scales:
            check_finite(self.name, **{"each of scales": scale})
        levels = len(scales)
        weights = _per_level(self.name, "parallel_weights", 1.0 if parallel_weights is None
                             else parallel_weights, levels)  # fmt: skip
        for weight in weights:
            check_finite(self.name, **{"each of parallel_weights": weight})
        rescales = _per_level(self.name, "guidance_rescale", guidance_rescale, levels)
        for rescale in rescales:
            _check_rescale(self.name, rescale)
        if guidance_rescale_space not in ("data", "freq"):
            raise OptionError(f"{self.name}: guidance_rescale_space must be 'data' or 'freq'")
        self.scales, self.parallel_weights, self.rescales = scales, weights, rescales
        self.guidance_rescale_space = guidance_rescale_space
        self.upcast_to_double = upcast_to_double
        self.guidance_rescale = guidance_rescale
        # in data space the first level's value rescales the result; in freq space each
        # level's rescales that level, in `combine`
        final = rescales[0] if guidance_rescale_space == "data" else 0.0
        self._options(final, use_original_formulation, space)

    def _guided(self, level: int) -> bool:
        return not math.isclose(self.scales[level], self._identity)

    @property
    def enabled(self) -> bool:
        return any(self._guided(level) for level in range(len(self.scales)))

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        levels = len(self.scales)
        if cond.ndim != 4:
            raise DtkError(f"{self.name}: needs image-shaped samples [B, C, H, W], got "
                           f"{cond.ndim}-d ones")  # fmt: skip
        height, width = cond.shape[-2:]
        bottom, right = _padding(height, width, levels)
        # the pyramid halves the sample levels - 1 times, and reflects a 5x5 blur at the
        # borders of every level it halves, which needs 3 px: 4 (even) at the last one
        if levels > 1 and min(height + bottom, width + right) < 1 << levels:
            raise DtkError(f"{self.name}: {levels} levels need samples of at least "
                           f"{1 << levels} px a side, these are {height}x{width}; give fewer "
                           "scales")  # fmt: skip
        conds, unconds = laplacian_pyramid(cond, levels), laplacian_pyramid(uncond, levels)
        guided = []
        for level, (c, u) in enumerate(zip(conds, unconds)):
            if not self._guided(level):
                # diffusers appends the previous level's conditional band here (a bug that
                # breaks the reconstruction); this level's is what it means
                guided.append(c)
                continue
            update = c - u
            weight = self.parallel_weights[level]
            if not math.isclose(weight, 1.0):
                parallel, orthogonal = project(update, c, range(1, c.ndim),
                                               self.upcast_to_double)  # fmt: skip
                update = weight * parallel + orthogonal
            g = (c if self.use_original_formulation else u) + self.scales[level] * update
            if self.guidance_rescale_space == "freq" and self.rescales[level] > 0:
                g = rescale_cfg(g, c, self.rescales[level])
            guided.append(g)
        return from_pyramid(guided)[..., :height, :width]


@toolkit.hookimpl
def register_guidance(register: toolkit.Register) -> None:
    for guidance in (CFGZeroStar, AdaptiveProjectedGuidance, TangentialCFG,
                     FrequencyDecoupledGuidance):  # fmt: skip
        register(guidance)
