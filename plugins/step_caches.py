"""Step caches: DeepCache for UNets (Ma et al. 2024, "DeepCache: Accelerating Diffusion
Models for Free") and First Block Cache for transformers (ParaAttention's dynamic caching,
after TeaCache, Liu et al. 2024; diffusers' ``apply_first_block_cache``).

Both rest on one observation: from one network call to the next, a denoiser's deep features
change far less than its input. DeepCache recomputes the UNet in full every ``interval``
calls and, in between, only its shallowest skip branch, reusing everything deeper from the
last full call. First Block Cache runs a transformer's first block on every call and, when
its output changed by less than ``threshold`` (relative mean absolute change of the block's
residual since the last full call), skips the other blocks, adding what they added last time.

The toolkit enters a cache's state for the calls of one batch (`toolkit.StepCache`), so
nothing carries over between batches. DeepCache's schedule is the same for every row; First
Block Cache decides row by row, each row from its own history (diffusers decides for the whole
batch at once), and runs the remaining blocks on the rows that need them only: a sample's
image does not depend on its batch, and a batch of one gives diffusers' images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import toolkit
from toolkit import DtkError, OptionError, lazy_import

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")

#: DeepCache's branches per down block: its two resnets' outputs and its downsampler's
BRANCHES_PER_BLOCK = 3


class DeepCache:
    """A UNet's shallowest ``branch`` recomputed on every call, the rest every ``interval``
    calls (DeepCache's uniform schedule, ``DeepCacheSDHelper.set_params``)."""

    name = "deepcache"

    def __init__(self, interval: int = 3, branch: int = 0) -> None:
        if interval < 1:
            raise OptionError(f"deepcache: interval must be at least 1 (1: no caching), got "
                              f"{interval}")  # fmt: skip
        if branch < 0:
            raise OptionError(f"deepcache: branch must be 0 or more, got {branch}")
        self.interval, self.branch = interval, branch

    def check(self, network: Any) -> None:
        if not toolkit.is_unet(network):
            raise DtkError(f"deepcache reuses a UNet's deep features, and this network is a "
                           f"{type(network).__name__}; use first_block_cache on a "
                           "transformer")  # fmt: skip
        count = BRANCHES_PER_BLOCK * len(network.down_blocks)
        if self.branch >= count:
            raise DtkError(f"deepcache: branch {self.branch} is out of range; this UNet has "
                           f"{count} branches (0 to {count - 1})")  # fmt: skip

    def attach(self, network: Any) -> Any:
        self.check(network)
        calls = _DeepCacheCalls(self.interval, *divmod(self.branch, BRANCHES_PER_BLOCK))
        wrappers = [(network, calls.counted)]
        for position, (kind, block, layer, module) in enumerate(toolkit.unet_layers(network)):
            wrappers.append((module, calls.layer(position, kind, block, layer)))
        return toolkit.replaced_forwards(wrappers)


class _DeepCacheCalls:
    """One run of DeepCache over a batch: the call count and each layer's last output."""

    def __init__(self, interval: int, block: int, layer: int) -> None:
        self.interval, self.block, self.depth = interval, block, layer
        self.calls = -1
        self.outputs: dict[int, Any] = {}

    def counted(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return forward(*args, **kwargs)

        return call

    def reused(self, kind: str, block: int, layer: int) -> bool:
        """Whether a layer's output is taken from the last full call (DeepCache's
        ``is_skip_step``): every layer deeper than the branch, on calls between full ones."""
        if self.calls % self.interval == 0:
            return False
        if kind == "mid" or block > self.block:
            return True
        if block < self.block:
            return False
        return layer >= self.depth if kind == "down" else layer > self.depth

    def layer(self, position: int, kind: str, block: int, layer: int
              ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:  # fmt: skip
        def wrap(forward: Callable[..., Any]) -> Callable[..., Any]:
            def cached(*args: Any, **kwargs: Any) -> Any:
                if self.reused(kind, block, layer):
                    return self.outputs[position]
                self.outputs[position] = output = forward(*args, **kwargs)
                return output

            return cached

        return wrap


class FirstBlockCache:
    """A transformer's blocks after its first skipped, row by row, while the first block's
    residual changed by at most ``threshold`` since the row's last full call (diffusers'
    ``FirstBlockCacheConfig``).

    The default, 0.2, is the value diffusers' own examples use; its config's default, 0.05,
    skipped no call of the DiT-shaped benchmark model (benchmarks/step_caches.py), which
    pays from about 0.15 (docs/performance.md)."""

    name = "first_block_cache"

    def __init__(self, threshold: float = 0.2) -> None:
        if not math.isfinite(threshold) or threshold < 0:
            raise OptionError(f"first_block_cache: threshold must be a number >= 0 (0: no "
                              f"caching), got {threshold}")  # fmt: skip
        self.threshold = threshold

    def check(self, network: Any) -> None:
        if len(toolkit.transformer_blocks(network)) < 2:
            raise DtkError(f"first_block_cache skips a transformer's blocks after its first, "
                           f"and this network (a {type(network).__name__}) has no list of "
                           "transformer blocks; use deepcache on a UNet")  # fmt: skip

    def attach(self, network: Any) -> Any:
        self.check(network)
        blocks = [module for _, module in toolkit.transformer_blocks(network)]
        run = _FirstBlockRun(self.threshold)
        wrappers = [(blocks[0], run.first(blocks[0]))]
        wrappers += [(block, run.later(block, tail=block is blocks[-1])) for block in blocks[1:]]
        return toolkit.replaced_forwards(wrappers)


class _FirstBlockRun:
    """One run of First Block Cache over a batch, per row: the first block's residual and
    what the later blocks added, both at the row's last full call."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.previous: torch.Tensor | None = None  # [B, n] first-block residuals
        self.added: list[torch.Tensor | None] | None = None  # later blocks' (hidden, encoder)
        self.first_output: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.computing: torch.Tensor | None = None  # [B] bool: rows the later blocks run on

    def decide(self, residual: torch.Tensor) -> torch.Tensor:
        """The rows whose first-block residual changed by more than the threshold (relative
        mean absolute change) since their last full call; they become those rows' last."""
        flat = residual.flatten(1).float()
        if self.previous is None:
            self.previous = flat
            return torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
        change = (flat - self.previous).abs().mean(1) / self.previous.abs().mean(1)
        computing = change > self.threshold
        self.previous = torch.where(computing[:, None], flat, self.previous)
        return computing

    def first(self, block: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def wrap(forward: Callable[..., Any]) -> Callable[..., Any]:
            def run(*args: Any, **kwargs: Any) -> Any:
                hidden_in = toolkit.bound_arguments(block, args, kwargs)["hidden_states"]
                output = forward(*args, **kwargs)
                hidden, encoder = _parts(block, output)
                self.computing = self.decide(hidden - hidden_in)
                self.first_output = (hidden, encoder)
                reused = ~self.computing
                if not bool(reused.any()):
                    return output
                # a reusing row: this call's first block plus what the rest added last time
                assert self.added is not None  # the first call computes every row
                hidden = _where(reused, hidden + self.added[0], hidden)
                if encoder is not None and self.added[1] is not None:
                    encoder = _where(reused, encoder + self.added[1], encoder)
                return _joined(block, output, hidden, encoder)

            return run

        return wrap

    def later(self, block: Any, tail: bool
              ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:  # fmt: skip
        def wrap(forward: Callable[..., Any]) -> Callable[..., Any]:
            def run(*args: Any, **kwargs: Any) -> Any:
                computing = self.computing
                if computing is None or bool(computing.all()):
                    output = forward(*args, **kwargs)
                    if tail:
                        self.record(_parts(block, output), slice(None))
                    return output
                inputs = toolkit.bound_arguments(block, args, kwargs)
                hidden = inputs["hidden_states"]
                encoder = inputs.get("encoder_hidden_states")
                if not bool(computing.any()):  # every row reuses: the block is skipped
                    return _joined(block, None, hidden, encoder)
                rows = computing.nonzero().squeeze(1)
                computed = _parts(block, forward(**toolkit.take_rows(inputs, rows, len(computing))))
                if tail:
                    self.record(computed, rows)
                hidden = hidden.index_copy(0, rows, computed[0])
                # SD 3's last block returns no text tokens: nor does its mixed result
                if computed[1] is None:
                    encoder = None
                elif torch.is_tensor(encoder):
                    encoder = encoder.index_copy(0, rows, computed[1])
                return _joined(block, None, hidden, encoder)

            return run

        return wrap

    def record(self, last: tuple[torch.Tensor, torch.Tensor | None], rows: Any) -> None:
        """What the blocks after the first added, on the rows that ran them."""
        assert self.first_output is not None
        added = [last[0] - self.first_output[0][rows], None]
        if last[1] is not None and self.first_output[1] is not None:
            added[1] = last[1] - self.first_output[1][rows]
        if self.added is None:  # the first call: every row ran
            self.added = added
            return
        for k, value in enumerate(added):
            if value is not None and self.added[k] is not None:
                self.added[k][rows] = value


def _parts(block: Any, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A block's output as (hidden_states, encoder_hidden_states or None)."""
    if torch.is_tensor(output):
        return output, None
    hidden, encoder = toolkit.block_output_indices(block)
    return output[hidden], None if encoder is None else output[encoder]


def _joined(block: Any, like: Any, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
    """A block's output made of `hidden` and `encoder`, shaped as the block returns it."""
    index_hidden, index_encoder = toolkit.block_output_indices(block)
    if index_encoder is None:
        return hidden
    joined: list[Any] = list(like) if like is not None else [None, None]
    joined[index_hidden], joined[index_encoder] = hidden, encoder
    return tuple(joined)


def _where(rows: torch.Tensor, chosen: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """`chosen` on `rows` (a [B] mask), `other` elsewhere."""
    return torch.where(rows.view(-1, *[1] * (chosen.ndim - 1)), chosen, other)


@toolkit.hookimpl
def register_step_caches(register: toolkit.Register) -> None:
    for cache in (DeepCache, FirstBlockCache):
        register(cache)
