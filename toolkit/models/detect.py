"""Which kind of model a folder holds, read from its configs alone (no weights, no torch).

dtk loads these families so far: label-conditioned (or unconditional) ``UNet2DModel``
folders trained as VP diffusion models with epsilon, v or sample prediction, with a fixed or
a learned variance (``"unet"``); ``UNet2DModel`` folders of VE score-SDE models, whose
scheduler is ``ScoreSdeVeScheduler`` (``"ve"``); Stable-Diffusion-1.x/2.x-style pipeline
folders (``"text"``); ``StableDiffusion3Pipeline`` folders (``"sd3"``); and
``StableDiffusionXLPipeline`` folders, refiner-style ``StableDiffusionXLImg2ImgPipeline``
ones included (``"sdxl"``); ``DiTPipeline`` (``"dit"``) and ``PixArtAlphaPipeline`` /
``PixArtSigmaPipeline`` folders (``"pixart"``); ``FluxPipeline`` folders (``"flux"``); and
latent consistency model folders (``"lcm"``: an SD-style folder whose pipeline is an LCM
one, whose UNet takes a guidance embedding, or whose scheduler is ``LCMScheduler``). Every other
folder is refused here, in one line that names its family: a folder of a family we do not
support must not run as one we do (a VE score-SDE folder used to run silently as an invented
VP model) nor fail deep inside loading with a misleading message.
"""

from __future__ import annotations

import pathlib
from typing import Any

from toolkit.errors import DtkError
from toolkit.models.loading import read_config

UNET, TEXT, VE = "unet", "text", "ve"
#: Stable Diffusion 3 pipeline folders (`toolkit.models.sd3` checks their configs)
SD3, SD3_PIPELINE = "sd3", "StableDiffusion3Pipeline"
#: Stable Diffusion XL pipeline folders, refiner-style ones included (`toolkit.models.sdxl`)
SDXL, SDXL_PIPELINES = "sdxl", ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
#: class-conditional DiT and text-to-image PixArt-α/Σ pipeline folders (`toolkit.models.dit`,
#: `toolkit.models.pixart`): pipeline class -> family
DIT, PIXART = "dit", "pixart"
TRANSFORMER_PIPELINES = {"DiTPipeline": DIT, "PixArtAlphaPipeline": PIXART,
                         "PixArtSigmaPipeline": PIXART}  # fmt: skip
#: Flux pipeline folders, and latent consistency model folders: an LCM pipeline's (class name
#: prefix), or an SD one whose UNet takes a guidance embedding or whose scheduler is LCM's
#: (`toolkit.models.flux`, `toolkit.models.lcm`)
FLUX, FLUX_PIPELINE = "flux", "FluxPipeline"
LCM, LCM_PIPELINE = "lcm", "LatentConsistencyModel"
#: the scheduler ``variance_type``s whose UNet predicts its variance too (diffusers' DDPM)
LEARNED_VARIANCE = ("learned", "learned_range")

SUPPORTED = (
    "dtk supports UNet2DModel folders (DDPM-style, learned variance included, and VE "
    "score-SDE), Stable Diffusion 1.x/2.x, latent consistency (LCM), Stable Diffusion XL, "
    "Stable Diffusion 3, Flux, DiT and PixArt-α/Σ pipeline folders so far"
)

#: pipeline class name prefix -> the family's name, most specific first
PIPELINE_FAMILIES = (
    ("StableDiffusionXL", "Stable Diffusion XL"),
    ("StableDiffusion3", "Stable Diffusion 3"),
    ("StableCascade", "Stable Cascade"),
    ("StableVideoDiffusion", "Stable Video Diffusion"),
    ("StableAudio", "Stable Audio"),
    ("Flux", "Flux"),
    ("PixArtAlpha", "PixArt-α"),
    ("PixArtSigma", "PixArt-Σ"),
    ("DiT", "DiT"),
    ("LatentConsistencyModel", "Latent Consistency Model (LCM)"),
    ("KarrasVe", "VE (Karras et al.)"),
    ("ConsistencyModel", "consistency model"),
    ("LDM", "latent diffusion with a VQ autoencoder (LDM)"),
    ("Kandinsky", "Kandinsky"),
    ("Wuerstchen", "Würstchen"),
    ("IF", "DeepFloyd IF"),
    ("AuraFlow", "AuraFlow"),
    ("Sana", "Sana"),
    ("Lumina", "Lumina"),
    ("HunyuanDiT", "Hunyuan-DiT"),
    ("Kolors", "Kolors"),
    ("CogView", "CogView"),
    ("AudioLDM", "AudioLDM"),
    ("AnimateDiff", "AnimateDiff"),
)

#: model class of a bare model folder (config.json) -> the family's name
MODEL_FAMILIES = {
    "FluxTransformer2DModel": "a Flux transformer without its pipeline folder (text encoders, "
    "tokenizers, VAE)",
    "SD3Transformer2DModel": "a Stable Diffusion 3 transformer without its pipeline folder "
    "(text encoders, tokenizers, VAE)",
    "PixArtTransformer2DModel": "a PixArt transformer without its pipeline folder (T5, "
    "tokenizer, VAE)",
    "DiTTransformer2DModel": "a DiT transformer without its pipeline folder (VAE, scheduler)",
    "Transformer2DModel": "DiT-style transformer",
    "UNet2DConditionModel": "a text-conditioned UNet without its pipeline folder (text "
    "encoder, tokenizer, VAE)",
}

#: scheduler class -> the kind of model it implies that dtk does not run
SCHEDULER_FAMILIES = {
    "KarrasVeScheduler": "VE (variance exploding, Karras et al.)",
    "CMStochasticIterativeScheduler": "consistency model",
    "EDMEulerScheduler": "EDM-parameterized",
    "EDMDPMSolverMultistepScheduler": "EDM-parameterized",
    "LCMScheduler": "Latent Consistency Model (LCM)",
    "TCDScheduler": "Trajectory Consistency Distillation (TCD)",
}


def detect_family(path: str | pathlib.Path) -> str:
    """``"unet"``, ``"ve"``, ``"text"``, ``"sd3"``, ``"sdxl"``, ``"dit"``, ``"pixart"``,
    ``"flux"`` or ``"lcm"`` for a folder dtk can load; a `DtkError` naming the family of any
    other folder (see the module docstring)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise DtkError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise DtkError(f"model path {path} is not a folder")
    if (path / "model_index.json").is_file():
        return _pipeline_family(path)
    return _bare_family(path)


def _pipeline_family(path: pathlib.Path) -> str:
    index = read_config(path / "model_index.json")
    if not isinstance(index, dict):
        raise DtkError(f"{path / 'model_index.json'} is not a pipeline index (a JSON object)")
    cls = str(index.get("_class_name", "a pipeline"))
    if cls == SD3_PIPELINE:
        return SD3
    if cls == FLUX_PIPELINE:
        return FLUX
    if cls in SDXL_PIPELINES:
        return _sdxl_family(path)
    if cls in TRANSFORMER_PIPELINES:
        if _check_scheduler(path, path / "scheduler" / "scheduler_config.json") != UNET:
            raise DtkError(f"{path} is a {cls} folder whose scheduler is ScoreSdeVeScheduler; "
                           "its transformer is a VP model")  # fmt: skip
        return TRANSFORMER_PIPELINES[cls]
    lcm_pipeline = cls.startswith(LCM_PIPELINE)
    for prefix, family in PIPELINE_FAMILIES:
        if cls.startswith(prefix) and not lcm_pipeline:
            _refuse(path, f"a {family} pipeline ({cls})")
    components = {k for k, v in index.items() if not k.startswith("_") and _present(v)}
    if "transformer" in components:
        _refuse(path, f"a transformer-based (DiT-family) pipeline ({cls})")
    if "text_encoder_2" in components:
        _refuse(path, f"a pipeline with two text encoders, Stable Diffusion XL-style ({cls})")
    if "unet" not in components or not (path / "unet" / "config.json").is_file():
        raise DtkError(f"{path} is a {cls} folder without a unet/ (config.json); {SUPPORTED}")
    scheduler = path / "scheduler" / "scheduler_config.json"
    unet = read_config(path / "unet" / "config.json")
    text_unet = unet.get("_class_name") == "UNet2DConditionModel"
    if lcm_pipeline and not text_unet:
        _refuse(path, f"a {cls} folder whose UNet is not a UNet2DConditionModel")
    family = _check_scheduler(path, scheduler, lcm=text_unet)
    if cls.startswith("ScoreSdeVe") and family != VE:
        raise DtkError(f"{path} is a {cls} folder whose scheduler is not ScoreSdeVeScheduler; "
                       "a VE score-SDE model needs its own")  # fmt: skip
    if text_unet and family in (UNET, LCM):
        lcm = family == LCM or lcm_pipeline or unet.get("time_cond_proj_dim") is not None
        if lcm and unet.get("addition_embed_type") != "text_time":
            return LCM
        _check_text_unet(path, unet)
        return TEXT
    _check_unet(path, unet, scheduler)
    return family


def _sdxl_family(path: pathlib.Path) -> str:
    """`SDXL` for an SDXL folder whose scheduler and UNet are SDXL's own kind (a VP model;
    `toolkit.models.sdxl` checks the rest)."""
    if _check_scheduler(path, path / "scheduler" / "scheduler_config.json") != UNET:
        raise DtkError(f"{path} is a Stable Diffusion XL folder whose scheduler is "
                       "ScoreSdeVeScheduler; SDXL is a VP model")  # fmt: skip
    unet = path / "unet" / "config.json"
    if unet.is_file():
        _check_text_unet(path, read_config(unet), xl=True)
    return SDXL


def _bare_family(path: pathlib.Path) -> str:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise DtkError(
            f"{path} is not a diffusers model folder: expected model_index.json (a pipeline "
            "folder) or a UNet2DModel folder with config.json and scheduler_config.json"
        )
    config = read_config(config_file)
    cls = config.get("_class_name", "UNet2DModel") if isinstance(config, dict) else None
    if cls in MODEL_FAMILIES:
        _refuse(path, f"{MODEL_FAMILIES[cls]} ({cls})")
    if cls != "UNet2DModel":
        _refuse(path, f"a {cls} folder")
    scheduler = path / "scheduler_config.json"
    family = _check_scheduler(path, scheduler)
    _check_unet(path, config, scheduler)
    return family


def _check_scheduler(path: pathlib.Path, scheduler: pathlib.Path, lcm: bool = False) -> str:
    """The family the scheduler implies: `VE` for ``ScoreSdeVeScheduler``, `LCM` for
    ``LCMScheduler`` when `lcm` (beside a text UNet), else `UNET`."""
    if not scheduler.is_file():
        return UNET  # the loader names the missing file
    config = read_config(scheduler)
    cls = str(config.get("_class_name", ""))
    if lcm and cls == "LCMScheduler":
        return LCM
    if cls in SCHEDULER_FAMILIES:
        _refuse(path, f"a {SCHEDULER_FAMILIES[cls]} model (its scheduler is {cls})")
    if cls.startswith("FlowMatch") or config.get("use_flow_sigmas"):
        _refuse(path, f"a rectified-flow (flow matching) model (its scheduler is {cls})")
    return VE if cls == "ScoreSdeVeScheduler" else UNET


def _check_unet(path: pathlib.Path, unet: dict[str, Any], scheduler: pathlib.Path) -> None:
    """A UNet outputs twice its input's channels (mean, then variance) exactly when its
    scheduler's variance_type says it learned the variance."""
    in_channels, out_channels = unet.get("in_channels", 3), unet.get("out_channels", 3)
    config = read_config(scheduler) if scheduler.is_file() else {}
    variance = str(config.get("variance_type") or "")
    if out_channels == 2 * in_channels and variance not in LEARNED_VARIANCE:
        raise DtkError(
            f"{path}: its UNet outputs {out_channels} channels for {in_channels} input "
            f"channels (a mean and a learned variance), but its scheduler's variance_type is "
            f"{variance or 'not set'}, not {' or '.join(LEARNED_VARIANCE)}"
        )
    if variance in LEARNED_VARIANCE and out_channels != 2 * in_channels:
        raise DtkError(
            f"{path}: its scheduler's variance_type is {variance}, but its UNet outputs "
            f"{out_channels} channels for {in_channels} input channels, not twice as many "
            "(it predicts no variance)"
        )


def _check_text_unet(path: pathlib.Path, unet: dict[str, Any], xl: bool = False) -> None:
    if unet.get("time_cond_proj_dim") is not None:
        _refuse(path, "a Latent Consistency Model distilled from Stable Diffusion XL (LCM; "
                      "its UNet takes the guidance scale as an embedding, "
                      "time_cond_proj_dim)")  # fmt: skip
    if unet.get("addition_embed_type") == "text_time" and not xl:
        _refuse(path, "a Stable Diffusion 1.x/2.x-style folder holding a Stable Diffusion XL "
                      "UNet (addition_embed_type text_time: it takes the pooled text of SDXL's "
                      "second text encoder, which this folder lacks)")  # fmt: skip


def _present(component: Any) -> bool:
    """A model_index.json entry names a component (``[library, class]``, not nulls)."""
    return isinstance(component, list) and any(part is not None for part in component)


def _refuse(path: pathlib.Path, what: str) -> None:
    raise DtkError(f"{path} is {what}, which dtk does not support yet; {SUPPORTED}")
