"""The VE score-SDE family: ``UNet2DModel`` folders of variance-exploding score models (Song
et al. 2021, NCSN++), as ``ScoreSdeVePipeline.save_pretrained`` writes them (``unet/`` and
a ``ScoreSdeVeScheduler`` in ``scheduler/``), or a bare ``UNet2DModel`` folder with that
scheduler's ``scheduler_config.json`` beside its weights.

What the network computes is read off diffusers' pipeline: it calls ``unet(x, sigma)`` on
the sample itself (no input scaling) with the noise level as the timestep, and steps with
the output as the score ``grad_x log p(x; sigma)`` (``drift = -(sigma^2 - sigma'^2) *
output``); the NCSN++ UNet (``time_embedding_type="fourier"``) divides its last layer's
output ``F`` by sigma to make it so. Since ``x = x0 + sigma eps`` has the score
``-(x - x0) / sigma^2``, the denoiser is Tweedie's ``D(x, sigma) = x + sigma^2 score``: in
Karras et al.'s table, ``c_in = 1``, ``c_skip = 1``, ``c_out = sigma`` (times ``F``), and
the network's noise input is sigma itself. The model is continuous-time on ``[sigma_min,
sigma_max]`` of its scheduler config (`NoiseLevels.continuous`), and its prior at sigma is
``x = eps * sigma``, as the pipeline starts from ``randn * init_noise_sigma`` (``=
sigma_max``). Score-SDE models are trained on data in ``[0, 1]`` (the pipeline's output
is ``clamp(x0, 0, 1)``), so `decode` maps to the toolkit's ``[-1, 1]``.

Labels work as in the label-UNet family (`toolkit.models.label_unet`), whose folder reading,
request checks and conditioning this family shares.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any

from toolkit import defaults
from toolkit.errors import DtkError
from toolkit.lazy import lazy_import
from toolkit.models.family import NetworkModel
from toolkit.models.label_unet import LabelUNetFolder, label_conditioning
from toolkit.models.parameterization import sigma_batch

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import torch

    from toolkit.conditions.labels import LabelSpace
    from toolkit.models.label_unet import LabelConditioning
    from toolkit.registry.protocols import SampleRequest
else:
    torch = lazy_import("torch")

#: ``ScoreSdeVeScheduler``'s defaults, for a config that leaves them out
SIGMA_MIN, SIGMA_MAX = 0.01, 1348.0


class VEFolder(LabelUNetFolder):
    """A VE score-SDE folder, read from its configs."""

    family = "ve"

    def default_sampling(self) -> tuple[str, str, int]:
        """The toolkit's general default (`toolkit.defaults.SAMPLER`): the label UNets'
        ``deis`` was measured on the shipped VP model, not on VE ones."""
        return defaults.SAMPLER, defaults.SCHEDULE, defaults.STEPS

    def check_scheduler_config(self) -> None:
        config = self._scheduler_config
        low, high = config.get("sigma_min", SIGMA_MIN), config.get("sigma_max", SIGMA_MAX)
        numeric = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (low, high))
        if not (numeric and 0 < low < high < float("inf")):
            raise DtkError(f"{self.path}: its ScoreSdeVeScheduler needs 0 < sigma_min < "
                           f"sigma_max, finite; it has {low!r} and {high!r}")  # fmt: skip
        unet_class = self.unet_config.get("_class_name", "UNet2DModel")
        if unet_class != "UNet2DModel":
            raise DtkError(f"{self.path}: a VE score-SDE folder needs a UNet2DModel, not "
                           f"{unet_class}")  # fmt: skip

    @property
    def sigma_min(self) -> float:
        return float(self._scheduler_config.get("sigma_min", SIGMA_MIN))

    @property
    def sigma_max(self) -> float:
        return float(self._scheduler_config.get("sigma_max", SIGMA_MAX))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "prediction_type": "score",
                "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}  # fmt: skip

    def load(self, *, device: Any, dtype: Any, trust_pickle: bool = False,
             attention_slicing: bool = False, vae_tiling: bool = False) -> VEModel:  # fmt: skip
        return VEModel(self, self.load_unet(device, dtype, trust_pickle))


class VE:
    """The variance-exploding score parameterization (see the module docstring): the
    network sees ``x`` (``c_in = 1``) at timestep ``sigma`` and returns the score;
    ``D = x + sigma^2 score``; the prior is ``eps * sigma``."""

    def inputs(self, x: torch.Tensor, sigma: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return x, sigma_batch(sigma, x.shape[0], x.device)

    def denoised(self, x: torch.Tensor, sigma: Any, score: torch.Tensor) -> torch.Tensor:
        s = sigma_batch(sigma, x.shape[0], x.device).to(x.dtype)
        return x + s.view(-1, *([1] * (x.ndim - 1))) ** 2 * score.to(x.dtype)

    def prior(self, eps: torch.Tensor, sigma: float) -> torch.Tensor:
        return eps * float(sigma)


class VEModel(NetworkModel):
    """A loaded VE score-SDE model: the sigma-space denoiser of its score network."""

    def __init__(self, folder: VEFolder, unet: Any) -> None:
        from toolkit.models.noise import NoiseLevels

        levels = NoiseLevels.continuous(folder.sigma_min, folder.sigma_max)
        super().__init__(folder, unet, levels, VE())
        self.unet = unet

    @property
    def labels(self) -> LabelSpace | None:
        return self.folder.labels

    def conditioning(self, batch: Sequence[SampleRequest],
                     text_branches: Mapping[str, str]) -> LabelConditioning:  # fmt: skip
        return label_conditioning(self.labels, batch, self.device)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Data in ``[0, 1]`` (what score-SDE models are trained on) to ``[-1, 1]``."""
        return x0 * 2 - 1
