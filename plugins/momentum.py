"""The momentum and warmup that Safe Latent Diffusion (Schramowski et al. 2023, eq. 8) and
semantic guidance (SEGA, Brack et al. 2023, which Fair Diffusion uses) put on their edit
term. One instance belongs to one sampling run: `reset` it when a batch starts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from toolkit import lazy_import

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")


class WarmedMomentum:
    """``push = edit + scale * momentum``, then ``momentum = beta * momentum + (1 - beta) *
    push``; the push applies from call `warmup_steps` on (0-based), while the momentum
    gathers from the first call. A call with another shape than the last starts afresh."""

    def __init__(self, scale: float, beta: float, warmup_steps: int) -> None:
        self.scale, self.beta, self.warmup_steps = scale, beta, warmup_steps
        self.reset()

    def reset(self) -> None:
        self.momentum: torch.Tensor | None = None
        self.calls = 0

    def __call__(self, edit: torch.Tensor) -> torch.Tensor | None:
        """The edit with momentum, or None while warming up."""
        if self.momentum is None or self.momentum.shape != edit.shape:
            self.reset()
            self.momentum = torch.zeros_like(edit)
        push = edit + self.scale * self.momentum
        self.momentum = self.beta * self.momentum + (1 - self.beta) * push
        step, self.calls = self.calls, self.calls + 1
        return None if step < self.warmup_steps else push
