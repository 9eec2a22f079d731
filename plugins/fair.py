"""Fair Diffusion (Friedrich et al. 2023, "Fair Diffusion: Instructing Text-to-Image
Generation Models on Fairness"): every sample gets a value of an attribute drawn from a
target distribution, and generation is guided towards it.

On a label-conditioned model the drawn value completes the sample's condition and
classifier-free guidance does the rest. On a text-to-image model the prompt stays as it is
and semantic guidance (SEGA, Brack et al. 2023) adds, per sample, a push towards the drawn
value's edit prompt ("female person") and away from the other values' ("male person"). Edit
prompts are extra branches of the same batched forward pass (``text_branches``); the
per-sample directions come from the batch's conditions (``start_batch``).

The edit rule and its options follow diffusers' ``SemanticStableDiffusionPipeline``, and the
defaults are those of the paper's released generation script (edit scale 4, warmup 5,
threshold 0.95, momentum 0.5, beta 0.6, edit prompts "{value} person"), so the same
scheduler, seeds and settings give the same images.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import toolkit
from plugins.guidance import CFG, check_finite
from plugins.momentum import WarmedMomentum
from plugins.stacking import BASE, Stacked, base_options, make_base
from toolkit import (
    DtkError,
    OptionError,
    lazy_import,
    optional_member,
    quantile_draw,
    seeded_uniform,
    target_distribution,
    value_words,
)

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")

#: the classifier-free guidance scale when none is given: the toolkit's defaults for
#: label-conditioned and for text-to-image models
LABEL_SCALE, TEXT_SCALE = 2.0, 7.5
EDIT = "edit:"
#: what the drawn value's edit prompt does (see `FairGuidance`)
MODES = ("edit", "prompt")


class FairGuidance(Stacked, CFG):
    """Fair Diffusion: each sample's value of `attribute` is drawn from `target`, then
    generation is guided towards it (classifier-free guidance at `scale`).

    `target` is ``uniform`` or shares such as ``light=0.5,dark=0.5``. The draw is fixed by the
    sample's seed alone (`toolkit.conditions.targets.seeded_uniform`: low-discrepancy over
    consecutive seeds), so a run's shares match the target closely and do not depend on batching or
    sharding; the drawn value is written to the sample's metadata like any condition.

    Label-conditioned models: the drawn value completes the condition (`scale` default 2).

    Text-to-image models: give the attribute's `values` (``female,male``) or a `words` file
    (`toolkit.read_words`; its values, and the words that stand for them in `edit_prompt`).
    Each value's edit prompt is `edit_prompt` with ``{value}`` filled in, and ``{prompt}``
    with each sample's own prompt (``"{prompt} on {value} paper"``: the edit then differs
    from the prompt by the value alone, not by everything a generic prompt also says).
    `scale` defaults to 7.5. `mode` says what the drawn value's edit prompt does:

    * ``edit`` (Fair Diffusion): per sample, SEGA guidance at `edit_scale` pushes towards
      the drawn value's edit prompt and away from the others', keeping per channel only the
      elements above the `threshold` quantile, with momentum (`momentum_scale`,
      `momentum_beta`), applied after `warmup_steps` network evaluations (the momentum
      gathers during the warmup);
    * ``prompt``: the drawn value's edit prompt takes the place of the sample's prompt in
      the guidance (its conditional estimate), as the drawn value completes the condition of
      a label-conditioned model; ``"{prompt} on {value} paper"`` asks for the value outright.
      It needs a base that combines clean-image estimates (``cfg``, ``apg``, ...).

    The guidance the edit goes on top of is `base` (default ``cfg``; any guider: ``apg``,
    ``pag``, ``cfg_zero_star``, ...), with its options as ``base.KEY=VALUE`` and `scale` as
    its scale unless ``base.scale`` is given (`plugins.stacking`).
    """

    name = "fair"

    def __init__(
        self,
        attribute: str = "group",
        target: str = "uniform",
        scale: float | None = None,
        values: list[str] | None = None,
        words: pathlib.Path | None = None,
        edit_prompt: str = "{value} person",
        edit_scale: float = 4.0,
        warmup_steps: int = 5,
        threshold: float = 0.95,
        momentum_scale: float = 0.5,
        momentum_beta: float = 0.6,
        base: str = "cfg",
        mode: str = "edit",
        **base_settings: Any,
    ) -> None:
        if not attribute:
            raise OptionError("fair: attribute must name the attribute to balance")
        if mode not in MODES:
            raise OptionError(f"fair: mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.text = values is not None or words is not None
        super().__init__((TEXT_SCALE if self.text else LABEL_SCALE) if scale is None else scale)
        check_finite(self.name, edit_scale=edit_scale, momentum_scale=momentum_scale)
        if not 0 <= threshold <= 1 or not 0 <= momentum_beta <= 1:
            raise OptionError("fair: threshold and momentum_beta must be in [0, 1]")
        if warmup_steps < 0:
            raise OptionError("fair: warmup_steps must be >= 0")
        self.attribute, self.target = attribute, target
        self.edit_scale, self.warmup_steps, self.threshold = edit_scale, warmup_steps, threshold
        self.momentum_scale, self.momentum_beta = momentum_scale, momentum_beta
        self.values: list[str] = []
        self.text_branches: dict[str, str] = {}
        if self.text:
            said = _value_words(attribute, values, words)
            self.values = list(said)
            self.text_branches = {
                EDIT + value: _edit_prompt(edit_prompt, text) for value, text in said.items()
            }
        self.base = make_base(self.name, base, self.scale, base_options(self.name, base_settings))
        if "uncond" not in self.base.branches:
            raise OptionError(f"fair: base {base!r} has no unconditional branch to guide from")
        self.mode = mode
        if mode == "prompt" and optional_member("guidance", self.base, "space") == "output":
            raise OptionError(f"fair: mode=prompt needs a base that combines clean-image "
                              f"estimates; {base!r} combines the network's outputs")  # fmt: skip
        #: the edit's own branches: the unconditional estimate and the edit prompts
        self._own = ("uncond", *self.text_branches) if self.text else ()
        self.branches = self.stack_branches(self._own)
        self._shares: dict[str, float] | None = None
        self._direction: torch.Tensor | None = None
        self._momentum = WarmedMomentum(momentum_scale, momentum_beta, warmup_steps)

    def assign(
        self, condition: Mapping[str, str], seed: int, attributes: Mapping[str, list[str]]
    ) -> dict[str, str]:
        if self._shares is None:
            self._shares = target_distribution(
                self.target, self._attribute_values(attributes), what="fair: target"
            )
        if self.attribute in condition:
            raise DtkError(
                f"fair: the request already fixes {self.attribute}={condition[self.attribute]}; "
                f"leave {self.attribute} unspecified and fair guidance draws it from the target"
            )
        u = seeded_uniform(seed, salt=self.attribute)
        return {**condition, self.attribute: quantile_draw(u, self._shares)}

    def _attribute_values(self, attributes: Mapping[str, list[str]]) -> list[str]:
        # a text-to-image model has no attributes of its own: they live in its prompts
        text_model = not attributes
        if self.text and not text_model:
            raise OptionError(
                "fair: values and words are for text-to-image models; a label-conditioned "
                "model's attribute values are its own"
            )
        if text_model and not self.text:
            raise OptionError(
                f"fair: on a text-to-image model give the values of {self.attribute!r} "
                "(values=female,male) or a words file (words=FILE)"
            )
        if self.text:
            return self.values
        if self.attribute not in attributes:
            raise OptionError(
                f"fair: the model has no attribute {self.attribute!r}; "
                f"its attributes: {', '.join(attributes)}"
            )
        return list(attributes[self.attribute])

    def start_batch(self, conditions: Sequence[Mapping[str, str]]) -> None:
        """Before each batch: its samples' drawn values fix each edit prompt's direction
        (+1 towards, -1 away), and the momentum and the warmup count start afresh."""
        self.start_base(conditions)
        if not self.text:
            return
        drawn = [c[self.attribute] for c in conditions]
        self._direction = torch.tensor(
            [[1.0 if d == value else -1.0 for d in drawn] for value in self.values]
        )
        self._momentum.reset()

    def active(self, sigma: float) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self.base_active(sigma), *self._own]))

    def __call__(self, preds: Mapping[str, torch.Tensor], sigma: float) -> torch.Tensor:
        guided = self.base_estimate(preds, sigma)
        if not self.text or sigma <= 0:
            return guided
        if self._direction is None:
            raise DtkError("fair: start_batch(conditions) must be called before each batch")
        if self.mode == "prompt":
            return self._prompted(preds, sigma)
        if math.isinf(sigma):
            return self._first_flow_step(preds, guided)
        push = self._momentum(self._edit_guidance(preds, sigma))
        if push is None:
            return guided
        # `push` is in epsilon units; x0 = x - sigma * eps turns adding it to the guided
        # epsilon into subtracting sigma * push from the clean-image estimate
        return guided - sigma * push

    def _prompted(self, preds: Mapping[str, torch.Tensor], sigma: float) -> torch.Tensor:
        """The base's guidance with each sample's conditional estimate taken from its drawn
        value's edit prompt (``mode=prompt``)."""
        uncond = preds["uncond"]
        shape = (-1,) + (1,) * (uncond.ndim - 1)
        drawn = torch.zeros_like(uncond)
        for k, value in enumerate(self.values):
            chosen = (self._direction[k] > 0).to(uncond.device, uncond.dtype).view(shape)
            drawn += chosen * preds[EDIT + value]
        own = {b: preds[b] for b in self.base.branches if b in preds and b != BASE}
        return self.base({**own, "cond": drawn}, sigma)

    def _first_flow_step(self, preds: Mapping[str, torch.Tensor], guided: torch.Tensor
                         ) -> torch.Tensor:  # fmt: skip
        """The limit at sigma = inf, a rectified-flow model's first level (t = 1): the edit
        in epsilon units vanishes (so the momentum gathers nothing), while ``sigma * edit``,
        what the clean-image estimate moves by, is the edit computed at sigma = 1 (the
        quantile mask does not change when every element is divided by one sigma). The
        momentum's own term is 0: a run's first level finds it empty."""
        if self._momentum(torch.zeros_like(guided)) is None:
            return guided
        return guided - self._edit_guidance(preds, 1.0)

    def _edit_guidance(self, preds: Mapping[str, torch.Tensor], sigma: float) -> torch.Tensor:
        uncond = preds["uncond"]
        shape = (-1,) + (1,) * (uncond.ndim - 1)
        direction = self._direction.to(uncond.device)
        total = torch.zeros_like(uncond)
        for k, value in enumerate(self.values):
            # eps_edit - eps_uncond, from clean-image estimates at one x and sigma
            toward = (uncond - preds[EDIT + value]) / sigma
            edit = toward * (direction[k].view(shape) * self.edit_scale)
            # keep, per sample and channel, only the elements at or above the quantile
            magnitude = edit.abs()
            cut = torch.quantile(magnitude.flatten(start_dim=2), self.threshold, dim=2)
            total += torch.where(magnitude >= cut[..., None, None], edit, 0.0)
        return total


def _value_words(
    attribute: str, values: list[str] | None, words: pathlib.Path | None
) -> dict[str, str]:
    """value -> the words that stand for it, in the values' order."""
    try:
        said = value_words(attribute, values, words)
    except DtkError as exc:
        raise OptionError(f"fair: {exc}") from None
    if len(said) < 2 or (values is not None and len(said) != len(values)):
        raise OptionError(f"fair: {attribute!r} needs at least two different values")
    return said


def _edit_prompt(template: str, text: str) -> str:
    """The edit prompt of one value; a ``{prompt}`` field stays, for the model to fill with
    each sample's own prompt (the edit then differs from the prompt by the value alone)."""
    if "{value}" not in template:
        raise OptionError(f"fair: edit_prompt {template!r} must contain {{value}}")
    try:
        return template.format(value=text, prompt="{prompt}")
    except (KeyError, IndexError, ValueError) as exc:
        raise OptionError(
            f"fair: edit_prompt {template!r} may use the fields {{value}} and {{prompt}} only "
            f"({exc})"
        ) from None


@toolkit.hookimpl
def register_guidance(register: toolkit.Register) -> None:
    register(FairGuidance)
