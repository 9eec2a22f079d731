"""The small protocols each kind of plugin implements (for type checkers and readers).

Plugins need not inherit from anything: any class with a ``name`` and the call signature
below can be registered. See `toolkit.hookspecs` for the full contract of each hook.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from toolkit.noise import NoiseLevels

#: ``denoise(x, sigma)`` -> the model's clean-image estimate at noise level sigma
Denoiser = Callable[["torch.Tensor", Any], "torch.Tensor"]
#: ``noise(sigma, sigma_next)`` -> fresh standard normal noise shaped like the sample
NoiseSource = Callable[[float, float], "torch.Tensor"]
StepCallback = Callable[[dict[str, Any]], None]


@runtime_checkable
class Schedule(Protocol):
    name: ClassVar[str]

    def __call__(self, steps: int, noise: NoiseLevels) -> torch.Tensor: ...


@runtime_checkable
class Sampler(Protocol):
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
class AttributeClassifier(Protocol):
    name: ClassVar[str]
    attribute: str
    labels: Sequence[str]

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor: ...
