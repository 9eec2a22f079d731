"""The denoiser a sampler sees: a model's sigma-space denoiser with guidance applied.

`GuidedDenoiser` evaluates every branch a guidance method asks for at this noise level in
ONE batched forward pass (the branches' inputs come from the batch's `Conditioning`, built
by the model's family), then lets the guidance combine the estimates. It also exposes the
model's `noise_levels` and `scheduler_config`, which some samplers read (the ``diffusers``
adapter, ``ddim``'s clipping), and a learned-variance model's `variance` for the last call
(``ddpm`` reads it; `toolkit.models.family.Model.variance`).

A perturbed branch (a guidance's ``perturbations``: PAG, SEG, SLG, autoguidance's skipped
layers) takes another branch's inputs, and the model runs its rows perturbed in the same pass
(`toolkit.models.family.Model.perturbed`). A guide-model branch (a guidance's
``guide_models``: autoguidance's guiding model) takes another branch's inputs through the
network of another model, loaded beside the main one (`guides`): one more forward pass per
step for each such model, and `forwards` counts it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from toolkit.errors import DtkError
from toolkit.lazy import lazy_import
from toolkit.models.family import COND, UNCOND
from toolkit.registry.protocols import GuideModel, optional, perturbation_specs

if TYPE_CHECKING:
    import torch

    from toolkit.models.family import Conditioning, Model
    from toolkit.sampling.step_cache import CacheRuns
else:
    torch = lazy_import("torch")


def sigma_scalar(sigma: Any) -> float:
    """One float for a step's sigma (samplers pass one sigma for the whole batch)."""
    if hasattr(sigma, "ndim") and sigma.ndim > 0:
        return float(sigma.reshape(-1)[0])
    return float(sigma)


def active_branches(guidance: Any, sigma: float) -> tuple[str, ...]:
    """The branches `guidance` needs at `sigma`."""
    active = optional("guidance", guidance, "active")
    return tuple(active(sigma)) if active is not None else tuple(guidance.branches)


def guide_models(guidance: Any) -> dict[str, GuideModel]:
    """`guidance`'s guide-model branches (its optional ``guide_models``; a guidance with a
    ``base`` lists its base's, as it lists its perturbations), checked: each a
    `toolkit.GuideModel`, none also a perturbed branch."""
    found = dict(optional("guidance", guidance, "guide_models"))
    name = getattr(guidance, "name", "guidance")
    for spec in found.values():
        if not isinstance(spec, GuideModel):
            raise DtkError(f"guidance {name!r}: guide_models map branches to "
                           f"toolkit.GuideModel, not {type(spec).__name__}")  # fmt: skip
    both = set(found) & set(optional("guidance", guidance, "perturbations"))
    if both:
        raise DtkError(f"guidance {name!r}: branch {sorted(both)[0]!r} is both perturbed and "
                       "evaluated by a guide model; it can be one of them")  # fmt: skip
    return found


def branch_conditions(guidance: Any) -> dict[str, str]:
    """Each of `guidance`'s branches -> the branch whose inputs it takes: its own, or a
    perturbed or guide-model branch's ``condition``."""
    perturbations = optional("guidance", guidance, "perturbations")
    guides = guide_models(guidance)
    name = getattr(guidance, "name", "guidance")
    conditions = {}
    for branch in getattr(guidance, "branches", ()):
        if branch in perturbations:
            conditions[branch] = perturbation_specs(perturbations[branch], name)[0].condition
        elif branch in guides:
            conditions[branch] = guides[branch].condition
        else:
            conditions[branch] = branch
    return conditions


SPACES = ("denoised", "output")


def guidance_space(guidance: Any, model: Any) -> str:
    """The space `guidance` combines its branches in (its optional ``space``), checked
    against what `model` can convert to."""
    space = optional("guidance", guidance, "space")
    if space not in SPACES:
        raise DtkError(f"guidance {guidance.name!r} has space {space!r}; a guidance's space is "
                       "'denoised' or 'output'")  # fmt: skip
    if space == "output" and getattr(model, "output_space", None) is None:
        raise DtkError(_no_output_space(guidance, model))
    return space


def _no_output_space(guidance: Any, model: Any) -> str:
    return (f"guidance {guidance.name!r} combines the network's raw outputs (space 'output'), "
            f"and {type(model).__name__} does not say how they relate to its estimates "
            "(no output_space)")  # fmt: skip


#: the entry of `preds` holding a guidance's base's combination (`GuidanceOptions.base`)
BASE = "base"


class GuidedDenoiser:
    """``D(x, sigma)`` with `guidance` applied over `conditioning`'s branches; `guides` maps
    each guide-model branch of the guidance to its loaded model (`guide_models`)."""

    def __init__(self, model: Model, guidance: Any, conditioning: Conditioning,
                 guides: Mapping[str, Model] | None = None,
                 cache: CacheRuns | None = None) -> None:  # fmt: skip
        self.model = model
        #: the step cache on the model's network (`toolkit.sampling.step_cache`), if any
        self.cache = cache
        self.guidance = guidance
        self.conditioning = conditioning
        self.noise_levels = model.noise_levels
        self.scheduler_config = model.scheduler_config
        self.forwards = 0  # number of network calls, for tests and benchmarks
        self.variance: torch.Tensor | None = None  # see `Model.variance`
        self.space = guidance_space(guidance, model)
        #: the guidance this one edits (its optional ``base``), combined first, in its space
        self.base = optional("guidance", guidance, "base")
        self.base_space = None if self.base is None else guidance_space(self.base, model)
        #: perturbed branches: the inputs of another branch through a perturbed network
        self.perturbations = dict(optional("guidance", guidance, "perturbations"))
        #: guide-model branches -> their models: another branch's inputs through another
        #: model's network, in a pass of its own
        specs = guide_models(guidance)
        self.guides = {b: m for b, m in (guides or {}).items() if b in specs}
        self.conditions = branch_conditions(guidance)
        missing = sorted(set(specs) - set(self.guides))
        if missing:
            raise DtkError(f"guidance {guidance.name!r} evaluates branch {missing[0]!r} with a "
                           "guide model, and none was loaded for it")  # fmt: skip

    def _inputs_for(self, branch: str, batch: int, device: torch.device) -> dict[str, Any]:
        try:
            return self.conditioning.inputs(branch, batch, device)
        except KeyError:
            raise DtkError(
                f"guidance {self.guidance.name!r} asked for unknown branch {branch!r}"
            ) from None

    def _condition(self, branch: str) -> str:
        """The branch whose inputs `branch` takes: its own, or a perturbed or guide-model
        branch's ``condition``."""
        return self.conditions.get(branch, branch)

    def _perturbed(self, branches: tuple[str, ...], batch: int
                   ) -> contextlib.AbstractContextManager:  # fmt: skip
        """The model perturbed on the rows of each perturbed branch among `branches`."""
        rows = {range(k * batch, (k + 1) * batch): self.perturbations[b]
                for k, b in enumerate(branches) if b in self.perturbations}  # fmt: skip
        return self.model.perturbed(rows) if rows else contextlib.nullcontext()

    def __call__(self, x: torch.Tensor, sigma: Any) -> torch.Tensor:
        return self.with_unconditional(x, sigma)[0]

    def with_unconditional(self, x: torch.Tensor, sigma: Any
                           ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The guided estimate and the ``uncond`` branch's from the same forward pass (the
        guided one again where no ``uncond`` branch ran): what CFG++ samplers ask for,
        through `toolkit.with_unconditional`."""
        branches = active_branches(self.guidance, sigma_scalar(sigma))
        batch = x.shape[0]
        own = tuple(b for b in branches if b not in self.guides)
        found: dict[str, torch.Tensor] = {}
        self.variance = None
        if own:
            if self.cache is not None:
                self.cache.before_call((own, batch))
            with self._perturbed(own, batch):
                found.update(self._forward(self.model, own, x, sigma))
            # a learned-variance model's variance for this call: the cond branch's
            # (`Model.variance`)
            variance = getattr(self.model, "variance", None)
            if variance is not None:
                variance = variance.split(batch)[own.index(COND) if COND in own else 0]
            self.variance = variance
        # each guide model's branches: one pass of their own per model
        for guide in {id(m): m for b, m in self.guides.items() if b in branches}.values():
            mine = tuple(b for b in branches if self.guides.get(b) is guide)
            found.update(self._forward(guide, mine, x, sigma))
        preds: Mapping[str, torch.Tensor] = {b: found[b] for b in branches}
        guided = self._guide(preds, x, sigma)
        return guided, preds.get(UNCOND, guided)

    def _forward(self, model: Model, branches: tuple[str, ...], x: torch.Tensor, sigma: Any
                 ) -> dict[str, torch.Tensor]:  # fmt: skip
        """`branches` through `model` in one batched call: their estimates by branch."""
        batch = x.shape[0]
        xs = x if len(branches) == 1 else torch.cat([x] * len(branches))
        per_branch = [self._inputs_for(self._condition(b), batch, x.device) for b in branches]
        inputs = {k: torch.cat([p[k] for p in per_branch]) for k in per_branch[0]}
        if hasattr(sigma, "ndim") and sigma.ndim > 0:
            sigma = torch.cat([sigma] * len(branches))
        self.forwards += 1
        return dict(zip(branches, model.denoise(xs, sigma, **inputs).split(batch)))

    def _guide(self, preds: Mapping[str, torch.Tensor], x: torch.Tensor, sigma: Any
               ) -> torch.Tensor:  # fmt: skip
        """The guidance's combination of `preds` (clean-image estimates by branch at samples
        `x`). A guidance with a ``base`` gets the base's combination of its own branches as
        the ``base`` entry of `preds` (`fair` and `sld` add their edit to it)."""
        if self.base is not None:
            own = {b: preds[b] for b in active_branches(self.base, sigma_scalar(sigma))}
            preds = {**preds, BASE: self._combine(self.base, self.base_space, own, x, sigma)}
        return self._combine(self.guidance, self.space, preds, x, sigma)

    def _combine(self, guidance: Any, space: str, preds: Mapping[str, torch.Tensor],
                 x: torch.Tensor, sigma: Any) -> torch.Tensor:  # fmt: skip
        """`guidance`'s combination of `preds`, made in its `space`: for ``"output"``, each
        estimate as the network's output and the result back, through the model's
        ``output_space``."""
        if space == "denoised":
            return guidance(preds, sigma_scalar(sigma))
        if hasattr(sigma, "ndim") and sigma.ndim > 0:
            sigma = sigma[: x.shape[0]]  # every branch's sigmas are the batch's
        conversion = self.model.output_space(x, sigma)
        if conversion is None:
            raise DtkError(_no_output_space(guidance, self.model))
        # one (a, b) serves every branch: they differ in inputs or network, never in x or sigma
        a, b = conversion
        # b = 0 (sigma 0): every estimate is a, whatever the output; divide by 1 to keep it
        outputs = {k: (v - a) / torch.where(b == 0, 1.0, b) for k, v in preds.items()}
        return a + b * guidance(outputs, sigma_scalar(sigma))
