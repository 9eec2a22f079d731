"""Perturbed branches of one batched forward pass (PAG, SEG, SLG): a `Perturbation` applied
to a network's selected layers on some rows of the batch only.

Attention-level guidance (Ahn et al. 2024, "Self-Rectifying Diffusion Sampling with
Perturbed-Attention Guidance"; Hong 2024, "Smoothed Energy Guidance"; Stability AI's skip
layer guidance for SD 3.5) compares the conditional estimate with one from a deliberately
weakened network. diffusers runs that branch with its layers' attention processors swapped
(``PAGCFGIdentitySelfAttnProcessor2_0``, ``PAGJointAttnProcessor2_0``) or hooks
(``diffusers.hooks``: ``LayerSkipConfig``, ``SmoothedEnergyGuidanceConfig``) on a batch of its
own, or chunks the batch inside the processor. Here the toolkit's `GuidedDenoiser` keeps every
branch in one batch, and `perturbed` applies each perturbation to its branch's rows alone:
a forward hook on each selected module recomputes those rows with the perturbation and splices
them into the module's output (a skipped module's rows are its input), so the other rows are
exactly those of a plain forward pass. The hooks are removed when the pass ends, whatever
happens.

The perturbed computation reuses the module's own attention processor: the identity attention
map and SLG's skipped attention scores replace ``scaled_dot_product_attention`` while it runs
(as diffusers' ``AttentionScoreSkipFunctionMode``), SEG blurs the output of the query
projection ``to_q`` (as diffusers' ``SmoothedEnergyGuidanceHook``). A processor that computes
attention another way (sliced attention) is refused in one line rather than left unperturbed.

`check` resolves every perturbation's layers; `skeleton` builds a folder's network from its
config on the meta device, so plans check layers against the real module tree without weights.
"""

from __future__ import annotations

import contextlib
import math
import re
import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from toolkit.errors import DtkError
from toolkit.lazy import lazy_import
from toolkit.models.blocks import BLOCK_OUTPUTS, bound_arguments, take_rows
from toolkit.registry.protocols import Perturbation, perturbation_specs

if TYPE_CHECKING:
    import torch

    from toolkit.models.family import ModelFolder
else:
    torch = lazy_import("torch")

#: kinds that change how an attention layer computes (its processor runs again on the rows)
RECOMPUTED = ("identity_attention", "attention_scores", "blur_query")
#: joint attention processors -> whether the image tokens come first in the joint sequence
#: (SD 3 concatenates [image, text], Flux [text, image]); PAG's identity map covers them
JOINT_ORDER = {"JointAttnProcessor2_0": True, "JointAttnProcessor": True,
               "FluxAttnProcessor": False, "FluxAttnProcessor2_0": False}  # fmt: skip
#: the block lists a `Perturbation`'s ``stack="auto"`` looks for at the network's top level
#: (diffusers' ``_ALL_TRANSFORMER_BLOCK_IDENTIFIERS``, which ``LayerSkipConfig(fqn="auto")``
#: searches in the order of a set, so that a network with two (Flux) gets either)
AUTO_STACKS = ("blocks", "transformer_blocks", "single_transformer_blocks", "layers",
               "visual_transformer_blocks", "temporal_transformer_blocks")  # fmt: skip

#: network -> {perturbation: its target modules}, so a run resolves each perturbation once
_RESOLVED: weakref.WeakKeyDictionary[Any, dict[Perturbation, list[tuple[str, Any]]]] = (
    weakref.WeakKeyDictionary())  # fmt: skip


# -- selecting layers ------------------------------------------------------------------------


def _is_self_attention(module: Any) -> bool:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return isinstance(module, (Attention, AttentionModuleMixin)) and not getattr(
        module, "is_cross_attention", False)  # fmt: skip


def _pattern_matches(pattern: str, name: str) -> bool:
    """diffusers' rule for ``pag_applied_layers`` (``PAGMixin._set_pag_attn_processor``): the
    pattern is searched in the module name, except that a pattern and a name that both end
    in a number must end in the same one. So ``blocks.1`` matches ``transformer_blocks.1.attn``
    and ``transformer_blocks.12.attn`` alike: a block index selects one block exactly."""
    if re.search(pattern, name) is None:
        return False
    last, name_last = pattern.split(".")[-1], name.split(".")[-1]
    return not (last.isnumeric() and name_last.isnumeric() and last != name_last)


def _stack_name(network: Any, spec: Perturbation, guidance: str) -> str:
    """`spec`'s block list: as named, or for ``"auto"`` the network's one top-level block
    list among `AUTO_STACKS` (none or several: refused, naming them)."""
    if spec.stack != "auto":
        return spec.stack
    found = [name for name in AUTO_STACKS
             if isinstance(getattr(network, name, None), torch.nn.ModuleList)]  # fmt: skip
    if len(found) != 1:
        what = f"has {' and '.join(found)}" if found else "has no top-level block list"
        raise DtkError(f"{guidance}: stack 'auto' finds one top-level block list, and this "
                       f"network {what}; name the block list (fqn)")  # fmt: skip
    return found[0]


def _block(network: Any, spec: Perturbation, index: int, guidance: str) -> tuple[str, Any]:
    name = _stack_name(network, spec, guidance) if spec.stack else spec.stack
    stack = dict(network.named_modules()).get(name) if name else None
    if not isinstance(stack, torch.nn.ModuleList):
        raise DtkError(f"{guidance}: this network has no block list {spec.stack!r} to select "
                       f"block {index} from; {_where_attention_is(network)}")  # fmt: skip
    if not 0 <= index < len(stack):
        raise DtkError(f"{guidance}: block {index} is out of range; {name} holds "
                       f"{len(stack)} blocks (0 to {len(stack) - 1})")  # fmt: skip
    return f"{name}.{index}", stack[index]


def _where_attention_is(network: Any) -> str:
    """Where the network's self-attention layers are, for a refusal's hint."""
    places = dict.fromkeys(".".join(name.split(".")[:2]) for name, module in
                           network.named_modules() if _is_self_attention(module))  # fmt: skip
    if not places:
        return "it has no self-attention layers"
    listed = ", ".join(list(places)[:8]) + (", ..." if len(places) > 8 else "")
    return f"its self-attention layers are in {listed}"


def _attention_targets(network: Any, spec: Perturbation, guidance: str) -> list[tuple[str, Any]]:
    found: dict[str, Any] = {}
    for layer in spec.layers:
        if isinstance(layer, int):
            prefix, block = _block(network, spec, layer, guidance)
            matched = {f"{prefix}.{name}": m for name, m in block.named_modules()
                       if name and _is_self_attention(m)}  # fmt: skip
        else:
            try:
                matched = {name: m for name, m in network.named_modules()
                           if _is_self_attention(m) and _pattern_matches(layer, name)}  # fmt: skip
            except re.error as exc:
                raise DtkError(f"{guidance}: layer {layer!r} is not a valid pattern ({exc})"
                               ) from None  # fmt: skip
        if not matched:
            raise DtkError(f"{guidance}: layer {layer!r} matches no self-attention layer of "
                           f"this network; {_where_attention_is(network)}")  # fmt: skip
        found.update(matched)
    return list(found.items())


def _block_targets(network: Any, spec: Perturbation, guidance: str) -> list[tuple[str, Any]]:
    from diffusers.models.attention import FeedForward

    found: dict[str, Any] = {}
    for index in spec.layers:
        prefix, block = _block(network, spec, int(index), guidance)
        if spec.kind == "skip_block":
            found[prefix] = block
            continue
        ffs = {f"{prefix}.{n}": m for n, m in block.named_modules() if isinstance(m, FeedForward)}
        if not ffs:
            raise DtkError(f"{guidance}: block {prefix} has no feed-forward layer to skip")
        found.update(ffs)
    return list(found.items())


def targets(network: Any, spec: Perturbation, guidance: str = "guidance"
            ) -> list[tuple[str, Any]]:  # fmt: skip
    """The (name, module) pairs `spec` hooks in `network`: self-attention layers, blocks or
    feed-forward layers (`toolkit.Perturbation` says which); a selection that finds none, or
    one the kind cannot apply to, is refused in one line naming `guidance`."""
    cached = _RESOLVED.setdefault(network, {})
    if spec in cached:
        return cached[spec]
    if spec.kind in ("skip_ff", "skip_block"):
        found = _block_targets(network, spec, guidance)
    else:
        found = _attention_targets(network, spec, guidance)
    for name, module in found:
        _check_target(name, module, spec, guidance)
    cached[spec] = found
    return found


def _check_target(name: str, module: Any, spec: Perturbation, guidance: str) -> None:
    if spec.kind == "skip_block":
        kind = type(module).__name__
        if kind not in BLOCK_OUTPUTS and kind != "BasicTransformerBlock":
            raise DtkError(
                f"{guidance}: cannot skip {name}, a {kind} (blocks of "
                f"{', '.join(['BasicTransformerBlock', *BLOCK_OUTPUTS])} can be)"
            )
    if spec.kind == "blur_query" and not isinstance(getattr(module, "to_q", None),
                                                    torch.nn.Module):  # fmt: skip
        raise DtkError(f"{guidance}: {name} has no query projection to_q to blur")
    if spec.kind == "identity_attention" and getattr(module, "added_kv_proj_dim", None):
        processor = type(getattr(module, "processor", None)).__name__
        if processor not in JOINT_ORDER:
            raise DtkError(
                f"{guidance}: {name} is joint text-image attention through "
                f"{processor}, whose token order the identity map does not know"
            )


def check(network: Any, perturbations: Mapping[str, Any], guidance: str) -> None:
    """Resolve every perturbation of a guidance on `network` (a skeleton will do); a branch
    maps to a `Perturbation` or a tuple of them."""
    for value in perturbations.values():
        for spec in perturbation_specs(value, guidance):
            targets(network, spec, guidance)


def skeleton(folder: ModelFolder) -> Any:
    """`folder`'s denoising network built from its config on the meta device (no weights,
    no memory): its module tree, for checking perturbations at plan time. DtkError where
    the folder names no diffusers network class."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    config = getattr(folder, "unet_config", None) or getattr(folder, "transformer_config", None)
    cls = getattr(diffusers, str((config or {}).get("_class_name")), None)
    if cls is None:
        raise DtkError(f"{folder.path}: a {folder.family} model's network cannot be perturbed")
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # config keys of other versions: not ours
    try:
        with torch.device("meta"):
            return cls.from_config(config)
    finally:
        diffusers_logging.set_verbosity(verbosity)


# -- applying them -----------------------------------------------------------------------


@contextlib.contextmanager
def perturbed(network: Any, rows: Mapping[range, Any]) -> Iterator[None]:
    """While inside, each forward pass of `network` runs each `range` of batch rows in
    `rows` with its `Perturbation` (or its tuple of them, all applied; the other rows as
    usual); the hooks go when it exits."""
    handles = []
    try:
        for span, value in rows.items():
            for spec in perturbation_specs(value):
                for _, module in targets(network, spec):
                    hook = _Splice(slice(span.start, span.stop), spec)
                    handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()


class _Splice:
    """A forward hook: the module's output with rows `span` replaced by what `spec` makes
    of them (the rows recomputed with the perturbation, or the rows' input for a skip)."""

    def __init__(self, span: slice, spec: Perturbation) -> None:
        self.span, self.spec = span, spec

    def __call__(self, module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        inputs = bound_arguments(module, args, kwargs)
        hidden = inputs.get("hidden_states")
        if not torch.is_tensor(hidden):
            raise DtkError(f"cannot perturb a {type(module).__name__} called without "
                           "hidden_states")  # fmt: skip
        batch = hidden.shape[0]
        if self.spec.kind in RECOMPUTED:
            rows = _recompute(module, self.spec, take_rows(inputs, self.span, batch))
        else:
            rows = _skipped(module, self.spec, inputs, output, self.span)
        return _splice(output, rows, self.span, batch)


def _splice(output: Any, rows: Any, span: slice, batch: int) -> Any:
    if isinstance(output, (tuple, list)):
        return type(output)(_splice(o, r, span, batch) for o, r in zip(output, rows))
    if not torch.is_tensor(output) or output.ndim == 0 or output.shape[0] != batch:
        return output
    start, stop, _ = span.indices(batch)
    return torch.cat([output[:start], rows.to(output.dtype), output[stop:]])


def _skipped(module: Any, spec: Perturbation, inputs: Mapping[str, Any], output: Any,
             span: slice) -> Any:  # fmt: skip
    """The rows of a skipped module: its input in place of its output (diffusers'
    ``TransformerBlockSkipHook``, ``FeedForwardSkipHook`` and the attention processors'
    ``skip_processor_output_fn``)."""
    hidden = inputs["hidden_states"][span]
    context = inputs.get("encoder_hidden_states")
    context = context[span] if torch.is_tensor(context) else context
    if torch.is_tensor(output):
        return hidden
    if spec.kind == "skip_block":
        index_hidden, index_context = BLOCK_OUTPUTS[type(module).__name__]
        rows = list(output)
        rows[index_hidden], rows[index_context] = hidden, context
        return type(output)(rows)
    return type(output)((hidden, context, *output[2:]))  # joint attention: (image, text)


def _recompute(module: Any, spec: Perturbation, inputs: Mapping[str, Any]) -> Any:
    """The module's output on `inputs` (one branch's rows) with its attention perturbed."""
    if spec.kind == "blur_query":

        def blur(_module: Any, _args: Any, query: torch.Tensor) -> torch.Tensor:
            return blur_queries(query, spec.blur_sigma)

        handle = module.to_q.register_forward_hook(blur)
        try:
            return module.forward(**inputs)
        finally:
            handle.remove()
    mode = _attention_map_mode()(module, spec.kind, inputs)
    with mode:
        out = module.forward(**inputs)
    if not mode.calls:
        processor = type(getattr(module, "processor", None)).__name__
        raise DtkError(f"cannot perturb the attention map of a layer whose processor "
                       f"{processor} does not call scaled_dot_product_attention (drop "
                       "--attention-slicing)")  # fmt: skip
    return out


_MODE: type | None = None


def _attention_map_mode() -> type:
    """The `torch.overrides.TorchFunctionMode` that perturbs ``scaled_dot_product_attention``
    (a class made on first use: torch loads lazily)."""
    global _MODE
    if _MODE is None:

        class AttentionMapMode(torch.overrides.TorchFunctionMode):
            """``attention_scores``: the attention's output is its value (every query sees
            only its own token; diffusers' ``AttentionScoreSkipFunctionMode``).
            ``identity_attention``: the same for a self-attention layer; in joint
            text-image attention the image queries see themselves among the image tokens
            and every text token (diffusers' ``PAGJointAttnProcessor2_0`` mask)."""

            def __init__(self, module: Any, kind: str, inputs: Mapping[str, Any]) -> None:
                super().__init__()
                self.calls = 0
                self.image_first: bool | None = None
                self.image_tokens = 0
                context = inputs.get("encoder_hidden_states")
                if kind == "identity_attention" and torch.is_tensor(context):
                    hidden = inputs["hidden_states"]
                    processor = type(getattr(module, "processor", None)).__name__
                    if processor not in JOINT_ORDER:
                        raise DtkError(
                            f"cannot perturb joint attention through {processor}, "
                            "whose token order the identity map does not know"
                        )
                    self.image_first = JOINT_ORDER[processor]
                    self.image_tokens = (hidden.shape[1] if hidden.ndim == 3
                                         else math.prod(hidden.shape[2:]))  # fmt: skip

            def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                                   kwargs: dict | None = None) -> Any:  # fmt: skip
                kwargs = kwargs or {}
                if func is not torch.nn.functional.scaled_dot_product_attention:
                    return func(*args, **kwargs)
                names = ("query", "key", "value", "attn_mask")
                given = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
                query, value = given["query"], given["value"]
                if query.shape[-2] != value.shape[-2]:
                    return func(*args, **kwargs)  # cross-attention: not a map to perturb
                self.calls += 1
                if self.image_first is None:
                    return value
                mask = self._identity_mask(query)
                if given.get("attn_mask") is not None:
                    mask = mask + given["attn_mask"]
                rest = {k: v for k, v in kwargs.items() if k not in names}
                return func(query, given["key"], value, mask, *args[4:], **rest)

            def _identity_mask(self, query: torch.Tensor) -> torch.Tensor:
                length, image = query.shape[-2], self.image_tokens
                start = 0 if self.image_first else length - image
                mask = torch.zeros(length, length, device=query.device, dtype=query.dtype)
                block = mask[start : start + image, start : start + image]
                block.fill_(float("-inf"))
                block.fill_diagonal_(0)
                return mask

        _MODE = AttentionMapMode
    return _MODE


def blur_queries(query: torch.Tensor, sigma: float) -> torch.Tensor:
    """SEG's smoothed queries (Hong 2024, sec. 3): the first ``side**2`` tokens of `query`
    ``[B, tokens, C]`` read as a square ``side x side`` grid (as diffusers' and the paper's
    code assume), blurred by a Gaussian of `sigma` tokens with reflected borders, or
    replaced by their mean when `sigma` is infinite; the other tokens as they are.

    The kernel is the paper's (``ceil(6 sigma) + 1`` taps, odd), cut to the grid as diffusers'
    ``_gaussian_blur_2d`` cuts it. Unlike diffusers 0.42, whose branches are swapped (any
    finite sigma gives the mean; huggingface/diffusers#14187), a finite sigma blurs.
    """
    batch, tokens, channels = query.shape
    side = math.isqrt(tokens)
    square = side * side
    grid = query[:, :square].permute(0, 2, 1).reshape(batch, channels, side, side)
    if math.isinf(sigma):
        grid = grid.mean(dim=(-2, -1), keepdim=True).expand_as(grid)
    else:
        grid = _gaussian_blur(grid, sigma)
    blurred = grid.reshape(batch, channels, square).permute(0, 2, 1)
    return torch.cat([blurred, query[:, square:]], dim=1)


def _gaussian_blur(grid: torch.Tensor, sigma: float) -> torch.Tensor:
    side, channels = grid.shape[-1], grid.shape[1]
    size = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    size = min(size, side - (side % 2 - 1))  # reflected padding needs less than the side
    half = (size - 1) / 2
    taps = torch.exp(-0.5 * (torch.linspace(-half, half, steps=size) / sigma).pow(2))
    taps = (taps / taps.sum()).to(grid)
    kernel = torch.matmul(taps[:, None], taps[None, :]).expand(channels, 1, size, size)
    padded = torch.nn.functional.pad(grid, [size // 2] * 4, mode="reflect")
    return torch.nn.functional.conv2d(padded, kernel, groups=channels)
