"""The latent consistency model family (LCM; Luo et al. 2023): Stable-Diffusion-style folders
whose UNet was consistency-distilled, sampled in a few steps.

The folder is what ``LatentConsistencyModelPipeline.save_pretrained`` writes (an SD folder,
`toolkit.models.stable_diffusion`, with an ``LCMScheduler``), or an SD folder whose UNet
takes a guidance embedding (``time_cond_proj_dim``) or whose scheduler is an
``LCMScheduler`` (`toolkit.models.detect`). The network is the SD family's VP denoiser; what
differs is how it is guided and sampled:

* The guidance scale ``w`` was distilled into the UNet: it takes ``w - 1`` as a sinusoidal
  embedding (``timestep_cond``, `guidance_embedding`, as the pipeline's
  ``get_guidance_scale_embedding``), the ``guidance`` model option (default 8.5, the
  pipeline's). There is no unconditional branch: the family's default guidance is
  ``none``, guidance that needs the unconditional branch (``cfg``, ...) and negative
  prompts are refused, as the pipeline takes none.
* Its sampler is ``lcm`` (``LCMScheduler``'s consistency step, `plugins.samplers.lcm`) on the
  ``lcm`` schedule (its timesteps, from the scheduler config's ``original_inference_steps``,
  which the model's noise levels carry), 4 steps; ``--sampler diffusers`` runs the folder's
  own ``LCMScheduler``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from toolkit.errors import DtkError
from toolkit.lazy import lazy_import
from toolkit.models.family import UNCOND
from toolkit.models.noise import NoiseLevels
from toolkit.models.stable_diffusion import StableDiffusion, StableDiffusionFolder
from toolkit.registry.options import validate_options

torch = lazy_import("torch")

#: the pipeline's guidance scale and the LCMScheduler's original_inference_steps default
GUIDANCE = 8.5
ORIGINAL_STEPS = 50
#: the pipeline's sampling: LCMScheduler's step on its timesteps, 4 steps
SAMPLING = ("lcm", "lcm", 4)


class LCMOptions:
    """An LCM folder's model options (``--model-option KEY=VALUE``): ``guidance``, the
    scale embedded in the UNet's ``timestep_cond`` (default 8.5)."""

    def __init__(self, guidance: float | None = None) -> None:
        pass


@dataclasses.dataclass(frozen=True, eq=False)
class ConsistencyLevels(NoiseLevels):
    """An LCM's training noise levels, and the distillation's ``original_inference_steps``
    (its skipping-step schedule, which the ``lcm`` schedule takes its timesteps from)."""

    original_inference_steps: int = ORIGINAL_STEPS


def guidance_embedding(scale: float, dim: int) -> torch.Tensor:
    """``[1, dim]``: the sinusoidal embedding of ``w = scale - 1`` (the Imagen-style CFG
    scale the distillation used), as ``LatentConsistencyModelPipeline.
    get_guidance_scale_embedding`` computes it in float32."""
    w = torch.tensor([scale - 1], dtype=torch.float32) * 1000.0
    half = dim // 2
    rate = torch.log(torch.tensor(10000.0)) / (half - 1)
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -rate)
    angles = w[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(embedding, (0, dim % 2))


class LatentConsistencyFolder(StableDiffusionFolder):
    """A latent consistency model folder, read from its configs."""

    family = "lcm"

    def __init__(self, path: Any) -> None:
        super().__init__(path)
        #: the width of the UNet's guidance embedding (None: it takes none)
        self.guidance_dim = self.unet_config.get("time_cond_proj_dim")
        original = ORIGINAL_STEPS
        if self.scheduler_config.get("_class_name") == "LCMScheduler":
            original = self.scheduler_config.get("original_inference_steps", ORIGINAL_STEPS)
        if isinstance(original, bool) or not isinstance(original, int) or original < 1:
            raise DtkError(f"{path}: the scheduler's original_inference_steps {original!r} is "
                           "not a whole number of steps")  # fmt: skip
        self.original_inference_steps = original

    def check_model_options(self, options: Mapping[str, Any], from_strings: bool = False
                            ) -> dict[str, Any]:  # fmt: skip
        given = validate_options(LCMOptions, options, kind="model", name=self.family,
                                 from_strings=from_strings)  # fmt: skip
        guidance = given.get("guidance")
        if self.guidance_dim is None:
            if guidance is not None:
                raise DtkError(f"{self.path}: this LCM's UNet takes no guidance scale (no "
                               "time_cond_proj_dim)")  # fmt: skip
            return {}
        return {"guidance": float(GUIDANCE if guidance is None else guidance)}

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "guidance_embedding": self.guidance_dim,
            "original_inference_steps": self.original_inference_steps,
        }

    # -- requests ------------------------------------------------------------------------

    def check_request(self, conditions: Sequence[Mapping[str, str]], prompt_given: bool,
                      negative_given: bool, options: Mapping[str, bool]) -> None:  # fmt: skip
        super().check_request(conditions, prompt_given, negative_given, options)
        if negative_given:
            raise DtkError(f"{self.path} is a latent consistency model, which takes no negative "
                           "prompt (it was distilled against the empty prompt)")  # fmt: skip

    def default_guidance(self, conditional: bool) -> tuple[str, dict[str, Any]]:
        """None: the guidance scale is an input of the UNet (the ``guidance`` model
        option), not a second branch."""
        return ("none", {})

    def check_guidance(self, branches: set[str], text_branches: Mapping[str, str],
                       conditional: bool, name: str) -> None:  # fmt: skip
        super().check_guidance(branches, text_branches, conditional, name)
        if UNCOND in branches:
            raise DtkError(f"guidance {name!r} needs an unconditional branch, and a latent "
                           "consistency model has none: its guidance scale is distilled into "
                           "the UNet (--model-option guidance=...); use --guidance "
                           "none")  # fmt: skip

    def default_sampling(self) -> tuple[str, str, int]:
        """The pipeline's: LCMScheduler's step (``lcm``) on its timesteps (``lcm``), 4
        steps."""
        return SAMPLING

    # -- weights -------------------------------------------------------------------------

    def load(self, *, device: Any, dtype: Any, trust_pickle: bool = False,
             attention_slicing: bool = False, vae_tiling: bool = False
             ) -> LatentConsistency:  # fmt: skip
        model = super().load(device=device, dtype=dtype, trust_pickle=trust_pickle,
                             attention_slicing=attention_slicing,
                             vae_tiling=vae_tiling)  # fmt: skip
        options = {**self.check_model_options({}), **self.model_options}
        return LatentConsistency(self, model.unet, model.vae, model.text_encoder,
                                 model.tokenizer, options.get("guidance"))  # fmt: skip


class LatentConsistency(StableDiffusion):
    """A loaded LCM: the SD model, its noise levels carrying ``original_inference_steps``,
    and the guidance embedding every branch hands the UNet as ``timestep_cond``."""

    folder: LatentConsistencyFolder

    def __init__(self, folder: LatentConsistencyFolder, unet: Any, vae: Any, text_encoder: Any,
                 tokenizer: Any, guidance: float | None) -> None:  # fmt: skip
        super().__init__(folder, unet, vae, text_encoder, tokenizer)
        levels = self.noise_levels
        self.noise_levels = ConsistencyLevels(levels.sigma_min, levels.sigma_max, levels.sigmas,
                                              folder.original_inference_steps)  # fmt: skip
        #: the embedded guidance scale (None: a UNet without a guidance embedding)
        self.guidance_scale = guidance
        self.embedding = None
        if guidance is not None and folder.guidance_dim is not None:
            self.embedding = guidance_embedding(guidance, int(folder.guidance_dim))

    def embed(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The UNet's ``encoder_hidden_states`` for `prompts`, and its ``timestep_cond``
        (the guidance embedding, the same for every sample)."""
        rows = super().embed(prompts)
        if self.embedding is not None:
            rows["timestep_cond"] = self.embedding.expand(len(prompts), -1)
        return rows
