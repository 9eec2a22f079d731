"""T5's zero tokens run as one: Stable Diffusion 3 without T5, at a fraction of the cost.

Without a T5 encoder, ``StableDiffusion3Pipeline`` gives the transformer T5's 256 tokens as
zeros (``max_sequence_length``). Those tokens are identical when they enter the MMDiT and
stay identical after every block (each block treats tokens alike; identical queries attend
alike), so one token whose key counts 256 times in the joint attention (``log 256`` added to
its logits) gives the same output, to rounding, as the 256 copies. On a small image (the
shipped text model: 16 image tokens) that is most of the sequence; on SD 3 at 1024 px (4,096
image tokens) a few percent.

`FoldedZeros` applies it only where nothing else touches the attention: every processor the
default ``JointAttnProcessor2_0``, no hook on any module (the perturbed guidance branches of
`toolkit.models.attention` hook them), the network not compiled; otherwise the caller runs
the copies (`unfold`). The same fold trains the shipped text model
(`toolkit.recipes.text_model`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from toolkit.lazy import lazy_import

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")

#: the attention processor the fold replaces (the only one it knows to compute alike)
DEFAULT_PROCESSOR = "JointAttnProcessor2_0"


def unfold(context: torch.Tensor, copies: int) -> torch.Tensor:
    """A folded context ``[B, L + 1, J]`` with its last token repeated to `copies`."""
    return torch.cat([context[:, :-1], context[:, -1:].expand(-1, copies, -1)], dim=1)


class FoldedZeros:
    """A context manager running `transformer`'s joint attention with its last text token
    counted `copies` times; the processors are put back on exit, even after an error."""

    def __init__(self, transformer: Any, copies: int) -> None:
        self.transformer, self.copies = transformer, copies
        self.biased = BiasedJointAttention(math.log(copies))
        self.saved: dict[str, Any] = {}

    def foldable(self) -> bool:
        """Whether the fold computes what the copies would: default processors, no hooks,
        not compiled."""
        transformer = self.transformer
        if getattr(transformer, "_compiled_call_impl", None) is not None:
            return False
        processors = transformer.attn_processors.values()
        if any(type(p).__name__ != DEFAULT_PROCESSOR for p in processors):
            return False
        return not any(m._forward_hooks or m._forward_pre_hooks for m in transformer.modules())

    def __enter__(self) -> FoldedZeros:
        self.saved = dict(self.transformer.attn_processors)
        self.transformer.set_attn_processor(self.biased)
        return self

    def __exit__(self, *exc: object) -> None:
        self.transformer.set_attn_processor(self.saved)


class BiasedJointAttention:
    """MMDiT joint attention (diffusers' ``JointAttnProcessor2_0`` computes the same, without
    the bias): both streams' queries, keys and values, attention over their concatenation
    with `bias` added to the logits of the last key, split back and projected out."""

    def __init__(self, bias: float) -> None:
        self.bias = bias

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, **_: Any) -> Any:  # fmt: skip
        heads = attn.heads

        def split(x: torch.Tensor, norm: Any) -> torch.Tensor:
            x = x.unflatten(-1, (heads, -1)).transpose(1, 2)
            return norm(x) if norm is not None else x

        q = split(attn.to_q(hidden_states), attn.norm_q)
        k = split(attn.to_k(hidden_states), attn.norm_k)
        v = split(attn.to_v(hidden_states), None)
        image_tokens = q.shape[2]
        if encoder_hidden_states is not None:
            e = encoder_hidden_states
            q = torch.cat([q, split(attn.add_q_proj(e), attn.norm_added_q)], dim=2)
            k = torch.cat([k, split(attn.add_k_proj(e), attn.norm_added_k)], dim=2)
            v = torch.cat([v, split(attn.add_v_proj(e), None)], dim=2)
        mask = q.new_zeros(1, k.shape[2])
        mask[0, -1] = self.bias
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        image, text = out[:, :image_tokens], out[:, image_tokens:]
        image = attn.to_out[1](attn.to_out[0](image))
        if encoder_hidden_states is None:
            return image
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return image, text
