"""The structure of a denoising network that its plugins reach into: a transformer's block
lists and what each block returns, a UNet's layers by depth, a module call's arguments by
name, a call's rows, and forwards replaced for a while.

Perturbed guidance branches (`toolkit.models.attention`) and step caches
(``plugins/step_caches.py``) both hook a network's blocks; what they need to know about a
diffusers block is kept here once.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from toolkit.lazy import lazy_import

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")

#: a block class -> (index of hidden_states, of encoder_hidden_states) in its output tuple
#: (diffusers' ``TransformerBlockRegistry`` has no entry for SD 3's block); a block that
#: returns one tensor returns hidden_states
BLOCK_OUTPUTS = {
    "JointTransformerBlock": (1, 0),
    "FluxTransformerBlock": (1, 0),
    "FluxSingleTransformerBlock": (1, 0),
}
#: inputs never indexed by batch row, whatever their first dimension
UNBATCHED = frozenset({"image_rotary_emb"})
#: a transformer's top-level block lists, in the order its forward runs them (Flux: the
#: double-stream blocks, then the single-stream ones)
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers")


@functools.cache
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def bound_arguments(module: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A call's arguments by name, keyword arguments of ``**kwargs`` included."""
    signature = _signature(type(module))
    bound = signature.bind(module, *args, **kwargs).arguments
    bound.pop(next(iter(signature.parameters)))  # self
    for name, parameter in signature.parameters.items():
        if parameter.kind is parameter.VAR_KEYWORD and name in bound:
            bound = {**{k: v for k, v in bound.items() if k != name}, **bound[name]}
    return dict(bound)


def take_rows(inputs: Mapping[str, Any], rows: Any, batch: int) -> dict[str, Any]:
    """`inputs` with every per-row tensor (first dimension `batch`) cut to `rows` (a slice
    or an index tensor); others, and those named in `UNBATCHED`, as they are."""

    def cut(name: str, value: Any) -> Any:
        if name in UNBATCHED:
            return value
        if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
            return value[rows]
        if isinstance(value, dict):
            return {k: cut(k, v) for k, v in value.items()}
        return value

    return {name: cut(name, value) for name, value in inputs.items()}


def output_indices(block: Any) -> tuple[int, int | None]:
    """Where `block`'s output holds hidden_states and encoder_hidden_states: (0, None) for a
    block that returns hidden_states alone."""
    return BLOCK_OUTPUTS.get(type(block).__name__, (0, None))


def transformer_blocks(network: Any) -> list[tuple[str, Any]]:
    """A transformer's blocks as (name, module), in the order its forward runs them."""
    found = []
    for stack in BLOCK_LISTS:
        blocks = getattr(network, stack, None)
        if isinstance(blocks, torch.nn.ModuleList):
            found += [(f"{stack}.{i}", block) for i, block in enumerate(blocks)]
    return found


def is_unet(network: Any) -> bool:
    """Whether `network` is a diffusers UNet: down blocks, a mid block, up blocks."""
    return all(hasattr(network, part) for part in ("down_blocks", "mid_block", "up_blocks"))


def unet_layers(network: Any) -> list[tuple[str, int, int, Any]]:
    """A UNet's layers by depth, as (kind, block, layer, module): each down block's
    attentions and resnets (``layer`` = their position), its downsampler (the layer after
    its resnets) and itself (layer 0); the mid block ("mid", 0, 0); each up block's
    attentions, resnets and upsampler and itself, numbered from the output side (block 0 is
    the last up block, and within it layer 0 its last resnet): so block ``b`` of the up
    path pairs with down block ``b``, as their skip connections do."""
    layers: list[tuple[str, int, int, Any]] = []
    for b, block in enumerate(network.down_blocks):
        resnets = list(getattr(block, "resnets", None) or [])
        for i, module in enumerate(getattr(block, "attentions", None) or []):
            layers.append(("down", b, i, module))
        layers += [("down", b, i, module) for i, module in enumerate(resnets)]
        for module in getattr(block, "downsamplers", None) or []:
            layers.append(("down", b, len(resnets), module))
        layers.append(("down", b, 0, block))
    if network.mid_block is not None:
        layers.append(("mid", 0, 0, network.mid_block))
    count = len(network.up_blocks)
    for position, block in enumerate(network.up_blocks):
        b = count - position - 1
        resnets = list(getattr(block, "resnets", None) or [])
        last = len(resnets) - 1
        for i, module in enumerate(getattr(block, "attentions", None) or []):
            layers.append(("up", b, last - i, module))
        layers += [("up", b, last - i, module) for i, module in enumerate(resnets)]
        for module in getattr(block, "upsamplers", None) or []:
            layers.append(("up", b, 0, module))
        layers.append(("up", b, 0, block))
    return layers


@contextlib.contextmanager
def replaced_forwards(wrappers: Sequence[tuple[Any, Callable[[Callable[..., Any]], Any]]]
                      ) -> Iterator[None]:  # fmt: skip
    """While inside, each module's ``forward`` is what its wrapper makes of the forward it
    had (``wrap(forward) -> new forward``); every one is put back on exit, whatever happens.
    Module hooks still run around a replaced forward."""
    saved = []
    try:
        for module, wrap in wrappers:
            saved.append((module, module.__dict__.get("forward")))
            module.forward = wrap(module.forward)
        yield
    finally:
        for module, previous in reversed(saved):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
