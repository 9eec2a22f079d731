"""One batch through guidance and sampler: per-sample noise in, float images out.

Sample ``k`` starts from ``torch.randn(shape, generator=Generator("cpu").manual_seed(seed))``
with its own seed, scaled to the model's prior at ``sigmas[0]``, and its generator alone
supplies its later noise, so a sample's result does not depend on the batch it is in
(docs/contracts.md, "Reproducibility").

A text model's prompts are encoded before sampling (`encode_batch`: every branch the
guidance uses), and then its text encoders leave the accelerator (`release_text_encoders`;
docs/models.md, "Text encoders and memory"). A guidance's guide-model branches run through
the loaded `guides` (`GuidedDenoiser`), with the main model's inputs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from toolkit.data.images import to_unit
from toolkit.lazy import lazy_import
from toolkit.registry.protocols import optional
from toolkit.sampling.denoiser import GuidedDenoiser, branch_conditions
from toolkit.sampling.step_cache import CacheRuns

if TYPE_CHECKING:
    import torch

    from toolkit.models.family import Conditioning, Model
    from toolkit.registry.protocols import SampleRequest
else:
    torch = lazy_import("torch")


def sample_images(
    model: Model,
    sampler: Any,
    guidance: Any,
    sigmas: torch.Tensor,
    batch: Sequence[SampleRequest],
    *,
    text_branches: Mapping[str, str] | None = None,
    guides: Mapping[str, Model] | None = None,
    step_cache: Any = None,
) -> torch.Tensor:
    """Float images ``[B, C, H, W]`` in [0, 1] for the samples of `batch` (non-finite
    values stay NaN, for the caller to catch).

    A guidance with a ``start_batch`` member is given the batch's conditions first;
    `text_branches` (a guidance's own prompts) defaults to the guidance's; `guides` maps
    each of its guide-model branches to the loaded guide model (`GuidedDenoiser`);
    `step_cache` (a `toolkit.StepCache`) is attached to the model's network for the batch's
    calls (`toolkit.sampling.step_cache`).
    """
    start_batch = optional("guidance", guidance, "start_batch")
    if start_batch is not None:
        start_batch([dict(sample.conditions) for sample in batch])
    if text_branches is None:
        text_branches = optional("guidance", guidance, "text_branches")
    shape, device = model.sample_shape, model.device
    generators = [torch.Generator("cpu").manual_seed(int(s.seed)) for s in batch]

    def draw() -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in generators])

    x = model.prior(draw(), float(sigmas[0])).to(device)

    def noise(sigma: float, sigma_next: float) -> torch.Tensor:
        return draw().to(device)

    with torch.inference_mode():
        conditioning = encode_batch(model, guidance, batch, text_branches, device)
        release_text_encoders(model)
        with CacheRuns(step_cache, getattr(model, "network", None)) as cache:
            guided = GuidedDenoiser(model, guidance, conditioning, guides, cache)
            x0 = integrate(sampler, guided, x, sigmas, noise)
        return to_unit(model.decode(x0))


def encode_batch(model: Model, guidance: Any, batch: Sequence[SampleRequest],
                 text_branches: Mapping[str, str], device: Any) -> Conditioning:  # fmt: skip
    """`batch`'s `Conditioning` (`Model.conditioning`), on a text model with the inputs of
    every branch `guidance` uses computed now, on `device`: its prompts go through the text
    encoders here, not during sampling (a branch the guidance never uses, such as ``uncond``
    without CFG, is never encoded; a perturbed or guide-model branch uses the inputs of its
    ``condition``)."""
    conditioning = model.conditioning(batch, text_branches)
    if hasattr(model, "release_text_encoders"):
        for branch in dict.fromkeys(branch_conditions(guidance).values()):
            with contextlib.suppress(KeyError):  # GuidedDenoiser names an unknown branch
                conditioning.inputs(branch, len(batch), device)
    return conditioning


def release_text_encoders(model: Model) -> None:
    """A text model's encoders leave the accelerator (they come back for a prompt not yet
    encoded); nothing for a model without text encoders, or on the CPU."""
    release = getattr(model, "release_text_encoders", None)
    if release is not None:
        release()


def integrate(sampler: Any, denoise: Any, x: torch.Tensor, sigmas: Any, noise: Any
              ) -> torch.Tensor:  # fmt: skip
    """Run `sampler` from ``sigmas[0]`` to 0.

    A flow model's schedule may start at ``sigma = inf`` (``t = 1``), where `x` is the noise
    itself. The first step from there is taken here, exactly: every first-order step
    (Euler, DDIM, DPM-Solver's first step) has the same finite limit, ``x0 + sigma_1 eps``,
    with ``x0`` the model's estimate at ``t = 1``. The sampler then runs from ``sigmas[1]``,
    so it only ever sees finite noise levels.
    """
    first = float(sigmas[0])
    if not math.isinf(first):
        return sampler(denoise, x, sigmas, noise=noise)
    denoised = denoise(x, first)
    following = float(sigmas[1])
    if following == 0:
        return denoised
    return sampler(denoise, denoised + following * x, sigmas[1:], noise=noise)
