"""Guidance away from a perturbed network: perturbed-attention guidance (``pag``), smoothed
energy guidance (``seg``) and skip layer guidance (``slg``).

Each adds a third branch, ``"perturbed"``: the conditional inputs through the network with some
layers weakened (`toolkit.Perturbation`), evaluated in the same batched forward pass as the
CFG branches, and guides away from it: ``u + scale (c - u) + s (c - p)``. The combination is
affine, so combining clean-image estimates is combining epsilons.

- ``pag`` (Ahn et al. 2024, "Self-Rectifying Diffusion Sampling with Perturbed-Attention
  Guidance"): the self-attention maps of the chosen layers are the identity; diffusers'
  ``StableDiffusionPAGPipeline`` and its kin (``PAGMixin``).
- ``seg`` (Hong 2024, "Smoothed Energy Guidance"): the queries of the chosen self-attention
  layers are blurred over the image by a Gaussian, uniform at infinite blur; diffusers'
  ``SmoothedEnergyGuidance`` guider.
- ``slg`` (Stability AI, SD 3.5): the chosen transformer blocks (or their attention or
  feed-forward layers) are skipped; ``StableDiffusion3Pipeline(skip_guidance_layers=...)``
  and diffusers' ``SkipLayerGuidance`` guider.

``autoguidance`` (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of
Itself") guides from a worse estimate rather than away from it beside CFG: ``g + scale (c -
g)``, its ``"guide"`` branch ``g`` either the unconditional inputs through the network with
layers skipped (diffusers' ``AutoGuidance`` guider) or the conditional inputs through a
weaker model of the same family (`guide`: the paper's own form), which the toolkit loads
beside the model and runs in a pass of its own (`toolkit.GuideModel`).

Options keep diffusers' defaults, with ``scale`` for ``guidance_scale``; as in the pipelines,
CFG is on for a scale above 1. `layers` names self-attention layers by diffusers' PAG rule (a
pattern searched in the module names: ``mid``, ``down_blocks.1``, ``up_blocks.0.attentions.1``)
or, as a whole number, exactly block ``i`` of the block list `stack` (``transformer_blocks``
of a DiT or SD 3), as the guiders' layer indices (a pattern ``transformer_blocks.1`` also
matches block 12, by diffusers' rule). The guiders' ``start``/``stop`` are fractions of the
steps, which a guidance does not know: ``seg`` and ``slg`` run the perturbed branch for noise
levels ``lo <= sigma <= hi`` instead (as ``interval`` limits CFG), saving its share of the pass
elsewhere; diffusers never guides on step 0. diffusers' ``pag_adaptive_scale`` (a scale
falling with the pipeline's timestep) is not supported: only its default, 0.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import toolkit
from plugins.guidance import check_finite, rescale_cfg
from plugins.guiders import SPACES
from toolkit import DtkError, GuideModel, OptionError, Perturbation

if TYPE_CHECKING:
    import torch

COND, UNCOND, PERTURBED, GUIDE = "cond", "uncond", "perturbed", "guide"
#: slg's `skip` -> the perturbation's kind (diffusers' ``LayerSkipConfig`` flags)
SKIPS = {"block": "skip_block", "attention": "skip_attention", "ff": "skip_ff",
         "attention_scores": "attention_scores"}  # fmt: skip


def selectors(name: str, layers: Sequence[str | int]) -> tuple[str | int, ...]:
    """`layers` as `toolkit.Perturbation` selects them: whole numbers (``"7"`` too, as the
    command line gives them) are block indices, other strings module-name patterns."""
    chosen: list[str | int] = []
    for layer in layers:
        if isinstance(layer, int) or (isinstance(layer, str) and layer.strip().isdigit()):
            chosen.append(int(layer))
            continue
        try:
            re.compile(layer)
        except re.error as exc:
            raise OptionError(f"{name}: layer {layer!r} is not a valid pattern ({exc})") from None
        chosen.append(layer.strip())
    if not chosen or any(c == "" or (isinstance(c, int) and c < 0) for c in chosen):
        raise OptionError(f"{name}: layers are one or more layer names or block indices >= 0")
    return tuple(chosen)


def _window(name: str, lo: float, hi: float | None) -> None:
    if not (math.isfinite(lo) and lo >= 0 and (hi is None or (math.isfinite(hi) and hi >= lo))):
        raise OptionError(f"{name}: need 0 <= lo <= hi (hi none: no upper limit)")


class PerturbedGuidance:
    """CFG at `scale` (on above 1) plus `perturbed_scale` times the conditional estimate
    minus the perturbed branch's; the shared part of ``pag``, ``seg`` and ``slg``.

    Without CFG the guided estimate starts from `anchor`: PAG's pipelines add the term to the
    conditional estimate, diffusers' SEG and SLG guiders to the perturbed one
    (``p + s (c - p)``). The perturbed branch runs for ``lo <= sigma <= hi`` only, and not at
    all at a scale of 0.
    """

    name: ClassVar[str]
    anchor: ClassVar[str] = COND

    def __init__(self, scale: float, perturbed_scale: float, perturbation: Perturbation,
                 lo: float = 0.0, hi: float | None = None) -> None:  # fmt: skip
        self.scale, self.perturbed_scale = scale, perturbed_scale
        self.lo, self.hi = lo, hi
        branches = [COND]
        if scale > 1:
            branches.append(UNCOND)
        self.perturbations: dict[str, Perturbation] = {}
        if perturbed_scale != 0:
            branches.append(PERTURBED)
            self.perturbations = {PERTURBED: perturbation}
        self.branches = tuple(branches)

    def active(self, sigma: float) -> tuple[str, ...]:
        inside = self.lo <= sigma and (self.hi is None or sigma <= self.hi)
        return self.branches if inside else tuple(b for b in self.branches if b != PERTURBED)

    def __call__(self, preds: Mapping[str, torch.Tensor], sigma: float) -> torch.Tensor:
        cond = preds[COND]
        perturbed = preds.get(PERTURBED)
        if UNCOND in preds:
            guided = preds[UNCOND] + self.scale * (cond - preds[UNCOND])
        elif perturbed is not None and self.anchor == PERTURBED:
            guided = perturbed
        else:
            guided = cond
        if perturbed is None:
            return guided
        return guided + self.perturbed_scale * (cond - perturbed)


class PerturbedAttentionGuidance(PerturbedGuidance):
    """Perturbed-attention guidance (Ahn et al. 2024): away from the estimate whose chosen
    self-attention maps are the identity, at `pag_scale`; CFG at `scale` on top (diffusers'
    ``StableDiffusionPAGPipeline``: ``pag_scale``, ``pag_applied_layers``, default
    ``"mid"``). Joint text-image attention (SD 3) keeps the text, as diffusers'
    ``PAGJointAttnProcessor2_0``."""

    name = "pag"

    def __init__(self, scale: float = 7.5, pag_scale: float = 3.0,
                 pag_adaptive_scale: float = 0.0, layers: list[str] = ("mid",),
                 stack: str = "transformer_blocks") -> None:  # fmt: skip
        check_finite(
            self.name, scale=scale, pag_scale=pag_scale, pag_adaptive_scale=pag_adaptive_scale
        )
        if pag_scale < 0:
            raise OptionError("pag: pag_scale must be >= 0")
        if pag_adaptive_scale != 0:
            raise OptionError(
                "pag: pag_adaptive_scale is not supported (it follows the "
                "pipeline's timestep, which a guidance does not see); only 0"
            )
        self.pag_scale, self.pag_adaptive_scale = pag_scale, pag_adaptive_scale
        self.layers = selectors(self.name, layers)
        spec = Perturbation("identity_attention", self.layers, stack=stack)
        super().__init__(scale, pag_scale, spec)


class SmoothedEnergyGuidance(PerturbedGuidance):
    """Smoothed energy guidance (Hong 2024): away from the estimate whose chosen
    self-attention layers see their queries blurred by a Gaussian of `blur_sigma` tokens
    (uniform above `blur_threshold_inf`), at `seg_scale`; CFG at `scale` on top (diffusers'
    ``SmoothedEnergyGuidance`` guider; a finite sigma blurs here, where diffusers 0.42 takes
    the mean, its branches swapped). The image is read as a square grid of tokens, as there.
    """

    name = "seg"
    anchor = PERTURBED

    def __init__(self, scale: float = 7.5, seg_scale: float = 2.8,
                 blur_sigma: float = 9999999.0, blur_threshold_inf: float = 9999.0,
                 layers: list[str] = ("mid",), stack: str = "transformer_blocks",
                 lo: float = 0.0, hi: float | None = None) -> None:  # fmt: skip
        check_finite(self.name, scale=scale, seg_scale=seg_scale, blur_sigma=blur_sigma,
                blur_threshold_inf=blur_threshold_inf)  # fmt: skip
        if blur_sigma <= 0:
            raise OptionError("seg: blur_sigma must be > 0")
        _window(self.name, lo, hi)
        self.seg_scale, self.blur_sigma = seg_scale, blur_sigma
        self.blur_threshold_inf = blur_threshold_inf
        self.layers = selectors(self.name, layers)
        sigma = math.inf if blur_sigma > blur_threshold_inf else blur_sigma
        spec = Perturbation("blur_query", self.layers, blur_sigma=sigma, stack=stack)
        super().__init__(scale, seg_scale, spec, lo, hi)


class SkipLayerGuidance(PerturbedGuidance):
    """Skip layer guidance (Stability AI, for SD 3.5): away from the estimate made with the
    chosen transformer blocks skipped (`skip`: the whole ``block``, its self-``attention``,
    its ``ff`` feed-forward or its ``attention_scores``), at `slg_scale`; CFG at `scale` on
    top. Defaults are SD 3.5 Medium's (``StableDiffusion3Pipeline``: layers 7, 8 and 9 at
    2.8, the steps past 1% and before 20%; at its 28 steps and shift 3 those are the noise
    levels between `lo` 13 and `hi` 1000, which leaves out the first, infinite one)."""

    name = "slg"
    anchor = PERTURBED

    def __init__(self, scale: float = 7.0, slg_scale: float = 2.8,
                 layers: list[str] = ("7", "8", "9"),
                 skip: Literal["block", "attention", "ff", "attention_scores"] = "block",
                 stack: str = "transformer_blocks", lo: float = 13.0,
                 hi: float | None = 1000.0) -> None:  # fmt: skip
        check_finite(self.name, scale=scale, slg_scale=slg_scale)
        _window(self.name, lo, hi)
        self.slg_scale, self.skip = slg_scale, skip
        self.layers = selectors(self.name, layers)
        if skip in ("block", "ff") and not all(isinstance(x, int) for x in self.layers):
            raise OptionError(f"slg: skip={skip} skips blocks: give layers as block indices")
        spec = Perturbation(SKIPS[skip], self.layers, stack=stack)
        super().__init__(scale, slg_scale, spec, lo, hi)


#: diffusers' ``LayerSkipConfig`` fields and their defaults (``indices`` has none)
LAYER_SKIP = {"indices": None, "fqn": "auto", "skip_attention": True,
              "skip_attention_scores": False, "skip_ff": True, "dropout": 1.0}  # fmt: skip


def _check_dropout(name: str, dropout: Any) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not math.isclose(
            dropout, 1.0):  # fmt: skip
        raise OptionError(f"{name}: dropout must be 1.0 (the layers skipped outright); a "
                          "dropout below 1 draws the process's random numbers in the forward "
                          "pass, so a sample would depend on its batch")  # fmt: skip


def layer_skips(name: str, config: Any, condition: str = UNCOND) -> tuple[Perturbation, ...]:
    """diffusers' ``LayerSkipConfig``s (one, a list, as dicts or as JSON text from a command
    line) as the perturbations of one branch taking the inputs of `condition`: the flags
    ``skip_attention`` and ``skip_ff`` together skip the whole block (``skip_block``), each
    alone its self-attention or feed-forward layers, ``skip_attention_scores`` makes the
    attention return its value (``attention_scores``, with ``skip_ff`` too where set), as
    ``_apply_layer_skip_hook``; ``fqn`` is the block list (``stack``)."""
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            raise OptionError(
                f"{name}: auto_guidance_config is a LayerSkipConfig, a dict of "
                "its fields or a list of them (JSON on the command line)"
            ) from None
    configs = list(config) if isinstance(config, (list, tuple)) else [config]
    specs: list[Perturbation] = []
    for given in configs:
        fields = given.to_dict() if hasattr(given, "to_dict") else given
        if not isinstance(fields, Mapping) or not configs:
            raise OptionError(f"{name}: auto_guidance_config is a LayerSkipConfig, a dict of its "
                              "fields or a list of them")  # fmt: skip
        unknown = sorted(set(fields) - set(LAYER_SKIP))
        if unknown:
            raise OptionError(f"{name}: unknown LayerSkipConfig field {unknown[0]!r}; fields: "
                              f"{', '.join(LAYER_SKIP)}")  # fmt: skip
        c = {**LAYER_SKIP, **fields}
        indices = [c["indices"]] if isinstance(c["indices"], int) else c["indices"]
        whole = isinstance(indices, (list, tuple)) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices)  # fmt: skip
        if not whole or not indices:
            raise OptionError(f"{name}: a LayerSkipConfig's indices are one or more block "
                              "indices >= 0")  # fmt: skip
        if not isinstance(c["fqn"], str) or not c["fqn"]:
            raise OptionError(f"{name}: a LayerSkipConfig's fqn names a block list, or is 'auto'")
        _check_dropout(name, c["dropout"])
        flags = ("skip_attention", "skip_attention_scores", "skip_ff")
        attention, scores, ff = (bool(c[k]) for k in flags)
        if attention and scores:
            raise OptionError(f"{name}: a LayerSkipConfig sets one of skip_attention and "
                              "skip_attention_scores")  # fmt: skip
        kinds = ["skip_attention"] * attention + ["attention_scores"] * scores
        kinds = ["skip_block"] if attention and ff else [*kinds, *["skip_ff"] * ff]
        if not kinds:
            raise OptionError(f"{name}: a LayerSkipConfig that skips nothing (skip_attention, "
                              "skip_attention_scores and skip_ff all false)")  # fmt: skip
        for kind in kinds:
            specs.append(Perturbation(kind, tuple(indices), condition=condition,
                                      stack=c["fqn"]))  # fmt: skip
    return tuple(specs)


class AutoGuidance:
    """Autoguidance (Karras et al. 2024): ``g + scale (c - g)`` (``c + scale (c - g)`` with
    `use_original_formulation`), from the estimate ``g`` of a bad version of the model,
    the ``"guide"`` branch; then diffusers' `guidance_rescale`. Two forms:

    - diffusers' ``AutoGuidance`` guider (no `guide`): ``g`` is the *unconditional* inputs
      through the network with the blocks `auto_guidance_layers` skipped (``LayerSkipConfig(i,
      fqn="auto")``), or as `auto_guidance_config` (diffusers' ``LayerSkipConfig``s: one, a
      list, dicts of their fields; JSON on the command line) says; only `dropout` 1.0, the
      layers skipped outright, keeps a sample independent of its batch. A perturbed branch of
      the one batched pass (`toolkit.Perturbation`, condition ``uncond``).
    - the paper's (`guide`, a model folder): ``g`` is the *conditional* inputs through a
      weaker model of the same family and conditioning (an earlier checkpoint, a smaller
      network), loaded beside the model, one more forward pass per step
      (`toolkit.GuideModel`); `scale` is the paper's ``w``.

    Guidance is off (the conditional estimate alone, one branch) at a scale of 1 (0 with
    `use_original_formulation`), as diffusers'. The combination is on the network's raw
    outputs (`space` ``"output"``, as diffusers' guiders), which only `guidance_rescale` tells
    apart from combining the clean-image estimates (``"denoised"``). diffusers' start/stop
    fractions of the steps are not offered.
    """

    name = "autoguidance"

    def __init__(
        self,
        scale: float = 7.5,
        auto_guidance_layers: list[int] | None = None,
        auto_guidance_config: Any = None,
        dropout: float | None = None,
        guidance_rescale: float = 0.0,
        use_original_formulation: bool = False,
        guide: pathlib.Path | None = None,
        space: Literal["output", "denoised"] = "output",
    ) -> None:
        name = self.name
        check_finite(name, scale=scale, guidance_rescale=guidance_rescale)
        if not 0 <= guidance_rescale <= 1:
            raise OptionError(f"{name}: guidance_rescale must be in [0, 1]")
        if space not in SPACES:
            raise OptionError(f"{name}: space must be 'output' or 'denoised'")
        skipping = auto_guidance_layers is not None or auto_guidance_config is not None
        if guide is not None and (skipping or dropout is not None):
            raise OptionError(f"{name}: guide (a weaker model) and skipped layers "
                              "(auto_guidance_layers, auto_guidance_config, dropout) are its two "
                              "forms; give one")  # fmt: skip
        if guide is None and not skipping:
            raise OptionError(f"{name}: give auto_guidance_layers (block indices to skip), "
                              "auto_guidance_config (diffusers' LayerSkipConfig) or guide (a "
                              "weaker model folder)")  # fmt: skip
        if auto_guidance_layers is not None and auto_guidance_config is not None:
            raise OptionError(f"{name}: give auto_guidance_layers or auto_guidance_config, not "
                              "both")  # fmt: skip
        self.scale, self.guidance_rescale = scale, guidance_rescale
        self.use_original_formulation, self.space = use_original_formulation, space
        self.guide = None if guide is None else pathlib.Path(guide)
        self.perturbations: dict[str, tuple[Perturbation, ...]] = {}
        self.guide_models: dict[str, GuideModel] = {}
        if auto_guidance_layers is not None:
            layers = list(auto_guidance_layers)
            if not layers or any(i < 0 for i in layers):
                raise OptionError(f"{name}: auto_guidance_layers are one or more block "
                                  "indices >= 0")  # fmt: skip
            _check_dropout(name, 1.0 if dropout is None else dropout)
            auto_guidance_config = {"indices": layers}
        elif auto_guidance_config is not None and dropout is not None:
            _check_dropout(name, dropout)  # diffusers ignores it beside a config
        self.auto_guidance_layers = auto_guidance_layers
        self.auto_guidance_config = auto_guidance_config
        # on at any scale but the one that gives the conditional estimate back
        self.enabled = not math.isclose(scale, 0.0 if use_original_formulation else 1.0)
        self.branches: tuple[str, ...] = (COND, GUIDE) if self.enabled else (COND,)
        if self.guide is None:
            try:
                skips = layer_skips(name, auto_guidance_config)
            except OptionError:
                raise
            except DtkError as exc:  # a Perturbation that refuses what a config asked
                raise OptionError(f"{name}: {exc}") from None
            if self.enabled:
                self.perturbations = {GUIDE: skips}
        elif self.enabled:
            self.guide_models = {GUIDE: GuideModel(self.guide, condition=COND)}

    def __call__(self, preds: Mapping[str, torch.Tensor], sigma: float) -> torch.Tensor:
        cond = preds[COND]
        bad = preds.get(GUIDE)
        if bad is None:
            return cond  # rescaling the conditional estimate to itself changes nothing
        start = cond if self.use_original_formulation else bad
        guided = start + self.scale * (cond - bad)
        if self.guidance_rescale > 0:
            guided = rescale_cfg(guided, cond, self.guidance_rescale)
        return guided


@toolkit.hookimpl
def register_guidance(register: toolkit.Register) -> None:
    for guidance in (PerturbedAttentionGuidance, SmoothedEnergyGuidance, SkipLayerGuidance,
                     AutoGuidance):  # fmt: skip
        register(guidance)
