"""The plugin contract: what each kind of plugin implements, and the objects it is handed.

Plugins need not inherit from anything: any class with a ``name`` and the members below can
be registered (`toolkit.registry.hookspecs` has the hooks). Members a kind may leave out
are declared once, here, in its ``...Options`` protocol; the toolkit reads them only
through `optional` (never by probing with ``getattr`` at the call site), which supplies
the documented default when a plugin does not define one. docs/plugins.md documents every
member, and a test fails when one is not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

from toolkit.errors import DtkError

if TYPE_CHECKING:
    import torch

    from toolkit.models.noise import NoiseLevels

#: ``denoise(x, sigma)`` -> the model's clean-image estimate at noise level sigma (with
#: guidance applied); see `with_unconditional` for the one extra a sampler may ask of it
Denoiser = Callable[["torch.Tensor", Any], "torch.Tensor"]
#: ``noise(sigma, sigma_next)`` -> fresh standard normal noise shaped like the sample
NoiseSource = Callable[[float, float], "torch.Tensor"]
#: called after every sampler step with ``i``, ``x``, ``sigma``, ``sigma_hat``, ``denoised``
StepCallback = Callable[[dict[str, Any]], None]
#: what a ``register_*`` hook is handed: call it with each plugin class (commands: instance)
Register = Callable[[Any], None]


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A safety filter's judgement of one image or request."""

    flagged: bool
    reason: str = ""
    score: float | None = None


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """What was asked for one sample: its index, seed and conditions (or prompt, with the
    negative prompt that guidance steers away from)."""

    index: int
    seed: int
    conditions: Mapping[str, str]
    prompt: str | None = None
    negative_prompt: str | None = None

    def text(self) -> str:
        """The request as text, for filters that match words."""
        parts = [f"{k}={v}" for k, v in self.conditions.items()]
        if self.prompt:
            parts.append(self.prompt)
        return " ".join(parts)


#: what a `Perturbation` changes in the network, on its branch's rows only
PERTURBATION_KINDS = ("identity_attention", "attention_scores", "blur_query",
                      "skip_attention", "skip_ff", "skip_block")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """A guidance branch evaluated by a perturbed network: the inputs of branch `condition`
    through the network with `kind` applied to the selected `layers`, on that branch's rows
    of the batched forward pass only (a guidance's `perturbations`; docs/plugins.md).

    `layers`: a string selects the network's self-attention layers whose module name it
    matches (a regular expression searched in the name, as diffusers' ``pag_applied_layers``:
    ``"mid"``, ``"down_blocks.1"``, ``"up_blocks.0.attentions.1"``); a whole number ``i``
    selects exactly block ``i`` of the block list `stack` (``"transformer_blocks"``: a DiT's or
    SD 3's; a UNet's ``"down_blocks.1.attentions.0.transformer_blocks"``; ``"auto"``: the
    network's one top-level block list, as diffusers' ``fqn="auto"`` finds it), as diffusers'
    ``LayerSkipConfig(indices, fqn)``. `kind`:

    - ``"identity_attention"``: the attention map of the image tokens is the identity
      (Ahn et al. 2024, PAG; diffusers' ``PAGIdentitySelfAttnProcessor2_0``, and for SD 3's
      joint attention ``PAGJointAttnProcessor2_0``, whose image tokens still see the text);
    - ``"attention_scores"``: the attention's output is its value projection, for every
      token (diffusers' ``LayerSkipConfig(skip_attention_scores=True)``);
    - ``"blur_query"``: the queries are blurred over the image grid by a Gaussian of
      `blur_sigma` tokens, uniform when infinite (Hong 2024, SEG);
    - ``"skip_attention"``, ``"skip_ff"``: the self-attention or feed-forward layers of the
      blocks return their input (``LayerSkipConfig(skip_attention / skip_ff)``);
    - ``"skip_block"``: the blocks return their input (SD 3's ``skip_guidance_layers``).
    """

    kind: Literal["identity_attention", "attention_scores", "blur_query", "skip_attention",
                  "skip_ff", "skip_block"]  # fmt: skip
    layers: tuple[str | int, ...]
    condition: str = "cond"
    blur_sigma: float = math.inf
    stack: str = "transformer_blocks"

    def __post_init__(self) -> None:
        if self.kind not in PERTURBATION_KINDS:
            raise DtkError(f"a perturbation's kind is one of {', '.join(PERTURBATION_KINDS)}; "
                           f"got {self.kind!r}")  # fmt: skip
        layers = (self.layers,) if isinstance(self.layers, (str, int)) else tuple(self.layers)
        if not layers or not all(isinstance(x, (str, int)) and not isinstance(x, bool)
                                 for x in layers):  # fmt: skip
            raise DtkError("a perturbation's layers are one or more names or block indices")
        if self.kind in ("skip_ff", "skip_block") and not all(isinstance(x, int) for x in layers):
            raise DtkError(f"a {self.kind} perturbation selects blocks by index")
        if not self.blur_sigma > 0:
            raise DtkError("a perturbation's blur_sigma is positive (math.inf: uniform)")
        object.__setattr__(self, "layers", layers)


def perturbation_specs(value: Perturbation | Sequence[Perturbation], guidance: str = "guidance"
                       ) -> tuple[Perturbation, ...]:  # fmt: skip
    """A perturbed branch's perturbations (a guidance's `perturbations` maps a branch to one
    `Perturbation`, or to several applied together on its rows), checked: one or more, all
    taking the inputs of one branch."""
    specs = (value,) if isinstance(value, Perturbation) else tuple(value)
    if not specs or not all(isinstance(s, Perturbation) for s in specs):
        raise DtkError(f"guidance {guidance!r}: perturbations map branches to a "
                       "toolkit.Perturbation, or to a tuple of them")  # fmt: skip
    if len({s.condition for s in specs}) > 1:
        raise DtkError(f"guidance {guidance!r}: the perturbations of one branch take the inputs "
                       "of one branch (their condition)")  # fmt: skip
    return specs


@dataclasses.dataclass(frozen=True)
class GuideModel:
    """A guidance branch evaluated by another model: the inputs of branch `condition` through
    the denoising network of the model folder `folder` (a guidance's `guide_models`), as
    autoguidance's guiding model (Karras et al. 2024: an earlier checkpoint or a smaller model
    of the same family, taking the same conditioning inputs).

    The toolkit checks the folder when it makes the plan (same family, sample shape and
    conditioning inputs), loads it once per run beside the main model (same device and
    precision) and runs its branches in a forward pass of their own, with the main model's
    inputs for `condition` (a text model's prompt embeddings are the main model's: the
    guide's text encoders must have the same configs, and are not used).
    """

    folder: pathlib.Path
    condition: str = "cond"

    def __post_init__(self) -> None:
        if not isinstance(self.folder, (str, pathlib.PurePath)):
            raise DtkError(f"a guide model's folder is a path; got {type(self.folder).__name__}")
        if not isinstance(self.condition, str) or not self.condition:
            raise DtkError("a guide model's condition names the branch whose inputs it takes")
        object.__setattr__(self, "folder", pathlib.Path(self.folder))


@runtime_checkable
class Schedule(Protocol):
    """``schedule(steps, noise)``: ``steps + 1`` strictly decreasing sigmas ending in 0."""

    name: ClassVar[str]

    def __call__(self, steps: int, noise: NoiseLevels) -> torch.Tensor: ...


@runtime_checkable
class Sampler(Protocol):
    """``sampler(denoise, x, sigmas, *, noise, callback=None)``: the sample at sigma 0."""

    name: ClassVar[str]

    def __call__(
        self,
        denoise: Denoiser,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        *,
        noise: NoiseSource,
        callback: StepCallback | None = None,
    ) -> torch.Tensor: ...


@runtime_checkable
class Guidance(Protocol):
    """Combines the clean-image estimates of several branches (conditionings) of one batch,
    all computed in one batched forward pass: ``guidance(preds, sigma)``, where `preds`
    maps each branch in `branches` (``"cond"``, ``"uncond"``, or a prompt branch of its
    own) to its estimate. Optional members: `GuidanceOptions`."""

    name: ClassVar[str]
    branches: Sequence[str]

    def __call__(self, preds: Mapping[str, torch.Tensor], sigma: float) -> torch.Tensor: ...


class GuidanceOptions(Protocol):
    """The members a guidance may add, and what the toolkit does when it has none."""

    #: branch name -> prompt, for text-to-image models: extra prompt branches, encoded once
    #: and evaluated in the same batched pass. Default: none.
    text_branches: Mapping[str, str]
    #: what `preds` and the result hold: ``"denoised"``, the clean-image estimates, or
    #: ``"output"``, each branch's estimate as the network's raw output (epsilon, v, a flow
    #: velocity or a score, as the model's family parameterizes it), for a combination that
    #: is not affine (projections, norms) and so differs between the two. The toolkit
    #: converts there and back (`toolkit.models.family.Model.output_space`). Default:
    #: ``"denoised"``.
    space: Literal["denoised", "output"]
    #: branch name -> `Perturbation` (or a tuple of them, applied together): branches
    #: (listed in `branches`) that take another branch's inputs (its ``condition``) through a
    #: perturbed network, in the same batched pass (PAG, SEG, SLG, autoguidance's skipped
    #: layers). Default: none.
    perturbations: Mapping[str, Perturbation | tuple[Perturbation, ...]]
    #: branch name -> `GuideModel`: branches (listed in `branches`) that take another
    #: branch's inputs (its ``condition``) through the network of another model folder,
    #: loaded once per run, in a forward pass of its own per step (autoguidance's guiding
    #: model). Default: none.
    guide_models: Mapping[str, GuideModel]
    #: a guidance this one edits (``fair`` and ``sld`` on top of ``apg``, ``pag``, ...): the
    #: toolkit evaluates its branches in the same pass (list them in `branches` too),
    #: combines them with it in its own `space`, and hands the result to this guidance as
    #: the ``"base"`` entry of `preds`. Default: none.
    base: Guidance | None

    def active(self, sigma: float) -> Sequence[str]:
        """The branches needed at `sigma` (fewer at some noise levels). Default: all of
        `branches`."""
        ...

    def assign(
        self, condition: Mapping[str, str], seed: int, attributes: Mapping[str, Sequence[str]]
    ) -> Mapping[str, str]:
        """Complete one sample's condition from its own `seed` (so the choice does not
        depend on batch, shard or rank); `attributes` maps the model's attribute names to
        their values (empty for a text-to-image model). Default: the condition as given."""
        ...

    def start_batch(self, conditions: Sequence[Mapping[str, str]]) -> None:
        """Called before each batch with its samples' conditions (reset state kept across
        steps, prepare per-sample directions). Default: nothing."""
        ...


@runtime_checkable
class SafetyFilter(Protocol):
    """Judges images, or requests before any compute: one `Verdict` per sample. An image
    filter is called as ``flt(images, requests)`` with float images ``[B, C, H, W]`` in
    ``[0, 1]`` (a copy it may not change), a request filter as ``flt(requests)``. Filters
    fail closed. Optional members: `SafetyFilterOptions`."""

    name: ClassVar[str]

    def __call__(self, *args: Any) -> Sequence[Verdict]: ...


class SafetyFilterOptions(Protocol):
    """The members a safety filter may add, and their defaults."""

    #: ``"request"``: judged from the requests alone, before any compute. Default:
    #: ``"image"``.
    stage: Literal["image", "request"]


@runtime_checkable
class AttributeClassifier(Protocol):
    """Predicts one attribute of images (how the fairness tools read a generator's
    outputs); registered like the others, but never called directly."""

    name: ClassVar[str]
    attribute: str
    labels: Sequence[str]

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, len(labels)]`` probabilities for float images ``[B, C, H, W]`` in [0, 1]."""
        ...


@runtime_checkable
class StepCache(Protocol):
    """Skips part of the denoising network on calls where its features barely change
    (DeepCache, First Block Cache). ``cache.attach(network)`` is a context in which the
    network's forward passes share the cache's state: the toolkit enters it for the calls
    of one batch with one layout of rows (the guidance's branches times the batch) and
    leaves it when the batch ends or the layout changes, so the state always starts fresh
    and never crosses batches; everything the cache changed in the network is put back on
    exit. Row ``r`` of every call is the same sample's same branch, so a cache that decides
    per row from that row's own history keeps each sample independent of its batch.
    Optional members: `StepCacheOptions`."""

    name: ClassVar[str]

    def attach(self, network: torch.nn.Module) -> contextlib.AbstractContextManager[Any]: ...


class StepCacheOptions(Protocol):
    """The members a step cache may add, and what the toolkit does when it has none."""

    def check(self, network: torch.nn.Module) -> None:
        """Refuse, with a `toolkit.DtkError`, a network the cache cannot serve (a UNet cache
        on a transformer, a layer the network lacks). Called when the run is planned, on
        the network built from its config without weights. Default: every network."""
        ...


#: kind -> (its protocol, the protocol of its optional members, their defaults)
CONTRACT: dict[str, tuple[type, type | None, dict[str, Any]]] = {
    "schedule": (Schedule, None, {}),
    "sampler": (Sampler, None, {}),
    "guidance": (
        Guidance,
        GuidanceOptions,
        {
            "text_branches": {},
            "space": "denoised",
            "perturbations": {},
            "guide_models": {},
            "base": None,
            "active": None,
            "assign": None,
            "start_batch": None,
        },
    ),
    "safety_filter": (SafetyFilter, SafetyFilterOptions, {"stage": "image"}),
    "attribute_classifier": (AttributeClassifier, None, {}),
    "step_cache": (StepCache, StepCacheOptions, {"check": None}),
}


def with_unconditional(denoise: Denoiser, x: torch.Tensor, sigma: Any
                       ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(guided, unconditional)``: `denoise`'s estimate at `sigma` and, from the same
    network call, the unconditional branch's estimate before guidance.

    CFG++ (Chung et al. 2024) takes the step's direction from the unconditional estimate
    and its landing point from the guided one, so its samplers need both. The toolkit's
    denoiser answers with its ``with_unconditional(x, sigma)`` method; a guidance that ran
    no ``uncond`` branch at this sigma, and any plain ``denoise`` callable (a test's
    stand-in, another library's model), give the guided estimate for both, which turns a
    CFG++ sampler into its plain namesake. Samplers that never ask are unaffected.
    """
    both = getattr(denoise, "with_unconditional", None)
    if both is not None:
        return both(x, sigma)
    denoised = denoise(x, sigma)
    return denoised, denoised


def optional(kind: str, plugin: Any, member: str) -> Any:
    """`plugin`'s optional `member` of its `kind`, or the contract's default (None for a
    method it does not define). The one place optional members are looked up."""
    defaults = CONTRACT[kind][2]
    if member not in defaults:
        raise KeyError(f"{member!r} is not an optional member of a {kind}")
    value = getattr(plugin, member, None)
    return defaults[member] if value is None else value


def members(protocol: type) -> list[str]:
    """The members a protocol declares (its annotations and methods), for the docs test."""
    names = [n for n in getattr(protocol, "__annotations__", {}) if not n.startswith("_")]
    names += [n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")]
    if "__call__" in vars(protocol):
        names.append("__call__")
    return list(dict.fromkeys(names))
