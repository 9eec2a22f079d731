"""Model adapters: a diffusers UNet becomes a sigma-space denoiser ``D(x, sigma) -> x0``.

Karras et al. 2022, table 1, for a VP (DDPM-trained) network ``F``: the input is scaled by
``c_in = 1 / sqrt(sigma^2 + 1)``, the timestep is the one whose training sigma is ``sigma``
(`NoiseLevels.sigma_to_t`), and the output becomes a clean-image estimate by
``x - sigma * F`` (epsilon), ``x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * F``
(v-prediction) or ``F`` itself (sample prediction).

`GuidedDenoiser` then evaluates every conditioning a guidance method asks for in ONE batched
forward pass and lets the guidance combine the estimates. What a branch feeds the network
comes from a conditioning: `LabelConditioning` (class labels; ``uncond`` is the null label)
or `TextConditioning` (``encoder_hidden_states``; ``uncond`` is the negative prompt's, and
a guidance's declared `text_branches` are further prompts shared by the batch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from toolkit._lazy import lazy_import
from toolkit.errors import DtkError

if TYPE_CHECKING:
    import torch

    from toolkit.model import LoadedModel
    from toolkit.noise import NoiseLevels
    from toolkit.text_model import TextModel
else:
    torch = lazy_import("torch")

COND, UNCOND = "cond", "uncond"


def sigma_batch(sigma: Any, batch: int, device: torch.device) -> torch.Tensor:
    """`sigma` (float, 0-d or [B] tensor) as a float32 [B] tensor on `device`."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    if sigma.ndim == 0:
        sigma = sigma.expand(batch)
    return sigma


def sigma_scalar(sigma: Any) -> float:
    """One float for a step's sigma (samplers pass one sigma for the whole batch)."""
    if hasattr(sigma, "ndim") and sigma.ndim > 0:
        return float(sigma.reshape(-1)[0])
    return float(sigma)


class UNetDenoiser:
    """``D(x, sigma, class_labels, **unet_inputs)`` for a `LoadedModel` or `TextModel`
    (VP, discrete timesteps); `unet_inputs` such as ``encoder_hidden_states`` go to the UNet."""

    def __init__(self, model: LoadedModel | TextModel) -> None:
        self.model = model
        self.unet = model.unet
        self.noise_levels: NoiseLevels = model.noise_levels
        self.prediction_type = model.prediction_type
        self.dtype = next(self.unet.parameters()).dtype

    def __call__(
        self,
        x: torch.Tensor,
        sigma: Any,
        class_labels: torch.Tensor | None = None,
        **unet_inputs: torch.Tensor,
    ) -> torch.Tensor:
        sigma = sigma_batch(sigma, x.shape[0], x.device)
        s = sigma.view(-1, *([1] * (x.ndim - 1)))
        c_in = 1 / (s**2 + 1).sqrt()
        t = self.noise_levels.sigma_to_t(sigma)
        x_in = (x * c_in).to(self.dtype)
        inputs = {k: v.to(self.dtype) if v.is_floating_point() else v
                  for k, v in unet_inputs.items()}  # fmt: skip
        out = self.unet(x_in, t, class_labels=class_labels, **inputs, return_dict=False)[0]
        out = out.to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return x / (s**2 + 1) - s * c_in * out
        return out


class LabelConditioning:
    """Branch inputs of a class-conditional model: the samples' labels (``cond``) or the
    null label (``uncond``); nothing for an unconditional model (`labels` None)."""

    def __init__(self, labels: torch.Tensor | None, null_label: int | None) -> None:
        self.labels = labels
        self.null_label = null_label

    def inputs(self, branch: str, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        if self.labels is None:
            return {}
        if branch == COND:
            return {"class_labels": self.labels.to(device)}
        if branch == UNCOND:
            null = torch.full((batch,), self.null_label, dtype=torch.long, device=device)
            return {"class_labels": null}
        raise KeyError(branch)


class TextConditioning:
    """Branch inputs of a text model: per-sample prompt embeddings (``cond``) and negative
    prompt embeddings (``uncond``; the empty prompt's when there is none), ``[B, L, D]``.

    `extra` holds the embeddings of a guidance's own `text_branches` (one prompt each, shared
    by the whole batch), ``[L, D]`` or ``[1, L, D]``; they are expanded to the batch here.
    """

    def __init__(
        self,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        extra: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.embeddings = {COND: cond, UNCOND: uncond}
        self.shared = {name: e.reshape(1, *e.shape[-2:]) for name, e in (extra or {}).items()}

    def inputs(self, branch: str, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        if branch in self.shared:
            states = self.shared[branch].expand(batch, -1, -1)
        else:
            states = self.embeddings[branch]
        return {"encoder_hidden_states": states.to(device)}


class GuidedDenoiser:
    """The denoiser a sampler sees: guidance applied, one batched forward per call.

    Each branch's network inputs come from `conditioning` (a `LabelConditioning` or
    `TextConditioning`); for class labels, `labels` (per-sample, None for an unconditional
    model) and `null_label` (every attribute unspecified; None if the model has none) may be
    given instead.
    """

    def __init__(
        self,
        denoiser: UNetDenoiser,
        guidance: Any,
        labels: torch.Tensor | None = None,
        null_label: int | None = None,
        *,
        conditioning: LabelConditioning | TextConditioning | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.guidance = guidance
        self.conditioning = conditioning or LabelConditioning(labels, null_label)
        self.noise_levels = denoiser.noise_levels
        self.scheduler_config = denoiser.model.scheduler_config  # for the diffusers adapter
        self.forwards = 0  # number of network calls, for tests and benchmarks

    def _inputs_for(self, branch: str, batch: int, device: torch.device) -> dict[str, Any]:
        try:
            return self.conditioning.inputs(branch, batch, device)
        except KeyError:
            raise DtkError(
                f"guidance {self.guidance.name!r} asked for unknown branch {branch!r}"
            ) from None

    def __call__(self, x: torch.Tensor, sigma: Any) -> torch.Tensor:
        branches = tuple(active_branches(self.guidance, sigma_scalar(sigma)))
        batch = x.shape[0]
        xs = x if len(branches) == 1 else torch.cat([x] * len(branches))
        per_branch = [self._inputs_for(b, batch, x.device) for b in branches]
        inputs = {k: torch.cat([p[k] for p in per_branch]) for k in per_branch[0]}
        if hasattr(sigma, "ndim") and sigma.ndim > 0:
            sigma = torch.cat([sigma] * len(branches))
        self.forwards += 1
        denoised = self.denoiser(xs, sigma, **inputs).split(batch)
        preds: Mapping[str, torch.Tensor] = dict(zip(branches, denoised))
        return self.guidance(preds, sigma_scalar(sigma))


def active_branches(guidance: Any, sigma: float) -> tuple[str, ...]:
    active = getattr(guidance, "active", None)
    return tuple(active(sigma)) if active is not None else tuple(guidance.branches)


def check_guidance(
    guidance: Any, model: LoadedModel | TextModel, conditional_request: bool
) -> None:
    """Refuse, before any compute, guidance the model or request cannot support.

    For a text model, `conditional_request` means a prompt or negative prompt was given.
    Branches beyond ``cond``/``uncond`` must be the guidance's `text_branches` (branch name
    -> prompt), which only a text model can serve.
    """
    branches = set(guidance.branches)
    text_branches = dict(getattr(guidance, "text_branches", None) or {})
    if text_branches and not getattr(model, "takes_prompts", False):
        raise DtkError(
            f"guidance {guidance.name!r} needs a text-to-image model (its "
            f"{'/'.join(sorted(text_branches))} branch is a prompt); {model.path} is not one"
        )
    if text_branches.keys() & {COND, UNCOND}:
        raise DtkError(f"guidance {guidance.name!r} may not redefine the cond/uncond branches")
    unknown = branches - {COND, UNCOND} - text_branches.keys()
    if unknown:
        raise DtkError(f"guidance {guidance.name!r} asks for unknown branches {sorted(unknown)}")
    if UNCOND not in branches:
        return
    if getattr(model, "takes_prompts", False):
        if not conditional_request:
            raise DtkError(
                f"guidance {guidance.name!r} needs a prompt to guide towards: give --prompt "
                "(or --negative-prompt), or use --guidance none"
            )
        return
    if model.labels is None:
        raise DtkError(
            f"guidance {guidance.name!r} needs a class-conditional model; "
            f"{model.path} is unconditional: use --guidance none"
        )
    if model.labels.null_label is None:
        raise DtkError(
            f"guidance {guidance.name!r} needs the model's unconditional (null) label, and "
            f"{model.path} has none: use --guidance none"
        )
    if not conditional_request:
        raise DtkError(
            f"guidance {guidance.name!r} needs a condition to guide towards: "
            "give --condition KEY=VALUE, or use --guidance none"
        )
