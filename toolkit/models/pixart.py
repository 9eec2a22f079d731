"""The PixArt family: PixArt-α and PixArt-Σ, text-to-image latent diffusion transformers.

The folder is what ``PixArtAlphaPipeline`` or ``PixArtSigmaPipeline`` loads:
``model_index.json``, ``transformer/`` (a ``PixArtTransformer2DModel``; published α folders
name it ``Transformer2DModel`` with ``norm_type`` ``ada_norm_single``, which diffusers loads
as the same model), ``text_encoder/`` (a ``T5EncoderModel``) with ``tokenizer/``, ``vae/``
(an ``AutoencoderKL``) and ``scheduler/`` (PixArt's ``DPMSolverMultistepScheduler``).

Sampling is VP in the VAE's latent space (epsilon; the learned sigma's channels dropped, as
the pipelines drop them: `toolkit.models.label_unet.mean_channels`). Prompts become the
transformer's ``encoder_hidden_states`` and ``encoder_attention_mask`` exactly as the
pipelines' ``encode_prompt`` computes them: the caption preprocessed as their default
``clean_caption=True`` does (lower-cased and stripped; cleaned further only where
``bs4`` and ``ftfy`` are installed, as there), T5 on ``max_sequence_length`` tokens (α: 120,
Σ: 300) with the padding masked out; the negative prompt likewise (the empty prompt when
none is given). A transformer that takes the resolution and aspect-ratio conditions
(PixArt-α at 1024 px, ``sample_size`` 128) gets the image's height and width, as the α
pipeline hands them.

Size: samples are drawn at the transformer's ``sample_size`` (the image is that times the
VAE's scale factor), or at the request's ``--height``/``--width`` (multiples of the VAE's
factor times the patch size), with the resolution conditions of the size sampled. The
pipelines' resolution binning (``use_resolution_binning``, on by default) is the model
option ``resolution_binning`` (default on): a requested size is mapped to the entry of
diffusers' aspect-ratio table (``ASPECT_RATIO_1024_BIN`` and its kin, the one the pipeline
picks by ``sample_size``) nearest its aspect ratio, sampled there, and the decoded image is
resized and center-cropped to the size asked, as the pipeline does. The tables hold the
pixel sizes of the published folders (a scale-8 VAE): a folder whose default size is not
its table's square entry is sampled at the size asked (the pipeline's
``use_resolution_binning=False``), and takes no ``resolution_binning`` option.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import importlib.util
import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from toolkit.errors import DtkError
from toolkit.lazy import lazy_import
from toolkit.models.dit import (
    check_latents,
    learned_sigma,
    sampling_twin,
    transformer_config,
    transformer_shape,
    twin_schedule_options,
)
from toolkit.models.family import VPModel
from toolkit.models.label_unet import mean_channels
from toolkit.models.loading import check_prediction_type, quiet_transformers, read_config
from toolkit.models.stable_diffusion import (
    PromptEmbeddings,
    TextConditioning,
    TextFolder,
    TextModel,
    check_parts,
    decode_latents,
    load_part,
    load_tokenizer,
    vae_dtype,
    warn_truncated,
)
from toolkit.registry.options import validate_options

if TYPE_CHECKING:
    import torch

    from toolkit.registry.protocols import SampleRequest
else:
    torch = lazy_import("torch")

#: weights file stem of each component
SAFE = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
        "text_encoder": "model"}  # fmt: skip
PARTS = (("transformer", "config.json"), ("vae", "config.json"),
         ("text_encoder", "config.json"), ("tokenizer", None),
         ("scheduler", "scheduler_config.json"))  # fmt: skip
TRANSFORMERS = ("PixArtTransformer2DModel", "Transformer2DModel")
NORM_TYPE = "ada_norm_single"
#: pipeline class -> its T5 tokens (``max_sequence_length``)
PIPELINES = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}
#: the pipelines' guidance scale and steps
CFG_SCALE = 4.5
STEPS = 20
#: the pipelines' resolution binning: the transformer's sample_size -> the diffusers
#: aspect-ratio table (its module in diffusers.pipelines.pixart_alpha, and its name) that
#: the pipeline bins a requested size with
_ALPHA = "pipeline_pixart_alpha"
BIN_TABLES = {
    "PixArtAlphaPipeline": {128: (_ALPHA, "ASPECT_RATIO_1024_BIN"),
                            64: (_ALPHA, "ASPECT_RATIO_512_BIN"),
                            32: (_ALPHA, "ASPECT_RATIO_256_BIN")},
    "PixArtSigmaPipeline": {256: ("pipeline_pixart_sigma", "ASPECT_RATIO_2048_BIN"),
                            128: (_ALPHA, "ASPECT_RATIO_1024_BIN"),
                            64: (_ALPHA, "ASPECT_RATIO_512_BIN"),
                            32: (_ALPHA, "ASPECT_RATIO_256_BIN")},
}  # fmt: skip


class PixArtOptions:
    """A PixArt folder's model options (``--model-option KEY=VALUE``):
    ``resolution_binning`` (default true), the pipelines' ``use_resolution_binning``, for a
    folder whose default size is its aspect-ratio table's square entry."""

    def __init__(self, resolution_binning: bool | None = None) -> None:
        pass


@functools.cache
def aspect_ratio_table(module: str, name: str) -> dict[str, tuple[int, int]]:
    """diffusers' aspect-ratio table `name` (ratio -> (height, width) in pixels, in its
    order), read from the source of ``diffusers.pipelines.pixart_alpha.<module>`` without
    importing it (the plan imports no torch); imported where the source cannot be read."""
    spec = importlib.util.find_spec("diffusers")
    if spec is not None and spec.submodule_search_locations:
        source = pathlib.Path(next(iter(spec.submodule_search_locations)), "pipelines",
                              "pixart_alpha", f"{module}.py")  # fmt: skip
        with contextlib.suppress(OSError, SyntaxError, ValueError):
            for node in ast.parse(source.read_text(encoding="utf-8")).body:
                if (isinstance(node, ast.Assign) and len(node.targets) == 1
                        and isinstance(node.targets[0], ast.Name)
                        and node.targets[0].id == name):  # fmt: skip
                    table = ast.literal_eval(node.value)
                    return {str(k): (int(v[0]), int(v[1])) for k, v in table.items()}
    loaded = getattr(importlib.import_module(f"diffusers.pipelines.pixart_alpha.{module}"), name)
    return {str(k): (int(v[0]), int(v[1])) for k, v in loaded.items()}


class PixArtFolder(TextFolder):
    """A ``PixArtAlphaPipeline`` or ``PixArtSigmaPipeline`` folder, read from its configs."""

    family = "pixart"
    cfg_scale = CFG_SCALE

    def __init__(self, path: pathlib.Path) -> None:
        super().__init__(path)
        index = read_config(path / "model_index.json")
        self.pipeline = str(index.get("_class_name"))
        if self.pipeline not in PIPELINES:
            raise DtkError(f"{path}: a {self.pipeline} folder is not a PixArt-α/Σ pipeline")
        check_parts(path, PARTS)
        self.transformer_config = transformer_config(path, TRANSFORMERS, NORM_TYPE, "PixArt")
        self.vae_config = read_config(path / "vae" / "config.json")
        self.text_config = read_config(path / "text_encoder" / "config.json")
        self._scheduler_config = read_config(path / "scheduler" / "scheduler_config.json")
        check_prediction_type(path, self._scheduler_config)
        check_latents(path, self.transformer_config, self.vae_config)
        width = self.transformer_config.get("caption_channels")
        if self.text_config.get("d_model") != width:
            raise DtkError(f"{path}: T5 gives {self.text_config.get('d_model')} features; the "
                           f"transformer's caption_channels is {width}")  # fmt: skip
        #: whether the transformer outputs a learned sigma (dropped), and samples with it
        self.learned_sigma, self.learned_variance = learned_sigma(
            self.transformer_config, self._scheduler_config)  # fmt: skip

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return self._scheduler_config

    @property
    def default_sample_shape(self) -> tuple[int, int, int]:
        return transformer_shape(self.transformer_config)

    @property
    def latent_patch(self) -> int:
        return int(self.transformer_config.get("patch_size", 2))

    @property
    def max_length(self) -> int:
        """T5's tokens: the pipeline's ``max_sequence_length`` (α 120, Σ 300)."""
        return PIPELINES[self.pipeline]

    @property
    def size_conditions(self) -> bool:
        """Whether the transformer takes the resolution and aspect ratio (its config's
        ``use_additional_conditions``; unset: at ``sample_size`` 128, as diffusers decides)."""
        use = self.transformer_config.get("use_additional_conditions")
        return self.default_sample_shape[1] == 128 if use is None else bool(use)

    def describe(self) -> dict[str, Any]:
        binned = self.binned_size
        return {
            **super().describe(),
            **({"binned_image_shape": [self.image_shape[0], *binned]} if binned else {}),
            "class": self.transformer_config.get("_class_name"),
            "pipeline": self.pipeline,
            "text_encoder": "T5EncoderModel",
            "max_sequence_length": self.max_length,
            "learned_sigma": self.learned_sigma,
            "image_shape": list(self.image_shape),
        }

    # -- requests ------------------------------------------------------------------------

    def check_request(self, conditions: Sequence[Mapping[str, str]], prompt_given: bool,
                      negative_given: bool, options: Mapping[str, bool]) -> None:  # fmt: skip
        super().check_request(conditions, prompt_given, negative_given, options)
        if options.get("attention_slicing"):
            raise DtkError(f"{self.path}: the PixArt transformer has no sliced attention; drop "
                           "--attention-slicing (a smaller --batch-size saves memory)")  # fmt: skip

    # -- size: the pipelines' resolution binning -----------------------------------------

    @property
    def bin_table(self) -> dict[str, tuple[int, int]] | None:
        """The aspect-ratio table the pipeline bins a size with, where it is this folder's:
        the table of its ``sample_size`` whose square entry is the folder's default size
        (every published folder's); None for any other folder."""
        where = BIN_TABLES[self.pipeline].get(self.default_sample_shape[1])
        if where is None:
            return None
        table = aspect_ratio_table(*where)
        side = self.default_sample_shape[1] * self.vae_scale_factor
        return table if table.get("1.0") == (side, side) else None

    def check_model_options(self, options: Mapping[str, Any], from_strings: bool = False
                            ) -> dict[str, Any]:  # fmt: skip
        given = validate_options(PixArtOptions, options, kind="model", name=self.family,
                                 from_strings=from_strings)  # fmt: skip
        binning = given.get("resolution_binning")
        if self.bin_table is None:
            if binning is not None:
                side = self.default_sample_shape[1] * self.vae_scale_factor
                raise DtkError(f"{self.path}: this PixArt folder's default size ({side} px) is "
                               "not an entry of the pipelines' aspect-ratio tables, so it "
                               "samples at the size asked; drop --model-option "
                               "resolution_binning")  # fmt: skip
            return {}
        return {"resolution_binning": True if binning is None else bool(binning)}

    @property
    def binned_size(self) -> tuple[int, int] | None:
        """``(height, width)`` in pixels that a requested size is sampled at when binning
        moves it: the table's entry nearest its aspect ratio (the first of equally near
        ones, as diffusers' ``classify_height_width_bin``); None when the size asked is
        the size sampled."""
        table = self.bin_table
        if self.image_size is None or table is None:
            return None
        if not self.model_options.get("resolution_binning", True):
            return None
        height, width = self.image_size
        nearest = min(table, key=lambda ratio: abs(float(ratio) - height / width))
        return None if table[nearest] == (height, width) else table[nearest]

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        binned = self.binned_size
        if binned is None:
            return super().sample_shape
        factor = self.vae_scale_factor
        return (self.default_sample_shape[0], binned[0] // factor, binned[1] // factor)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The image written: the size asked (binning resizes the sampled image to it)."""
        channels, height, width = super().image_shape
        if self.binned_size is not None and self.image_size is not None:
            height, width = self.image_size
        return (channels, height, width)

    def default_sampling(self) -> tuple[str, str, int]:
        """The pipeline's 20 steps with its ``DPMSolverMultistepScheduler``'s twin,
        ``dpmpp_2m`` on ``linspace`` with ``variant=dpmsolver``
        (`toolkit.models.dit.sampling_twin`)."""
        return sampling_twin(self._scheduler_config, STEPS)

    def default_schedule_options(self) -> dict[str, Any]:
        return twin_schedule_options(self._scheduler_config)

    # -- weights -------------------------------------------------------------------------

    def load(self, *, device: Any, dtype: Any, trust_pickle: bool = False,
             attention_slicing: bool = False, vae_tiling: bool = False) -> PixArt:  # fmt: skip
        from diffusers import AutoencoderKL, PixArtTransformer2DModel
        from transformers import T5EncoderModel

        def load(part: str, cls: Any, part_dtype: Any = dtype, **kwargs: Any) -> Any:
            return load_part(self.path, part, cls, SAFE[part], device=device, dtype=part_dtype,
                             trust_pickle=trust_pickle, **kwargs)  # fmt: skip

        transformer = load("transformer", PixArtTransformer2DModel, low_cpu_mem_usage=False)
        vae = load("vae", AutoencoderKL, vae_dtype(dtype, self.vae_config),
                   low_cpu_mem_usage=False)  # fmt: skip
        with quiet_transformers():
            text_encoder = load("text_encoder", T5EncoderModel)
        tokenizer = load_tokenizer(self.path, "tokenizer")
        if vae_tiling:
            vae.enable_tiling()
        return PixArt(self, transformer, vae, text_encoder, tokenizer)


class PixArt(TextModel, VPModel):
    """A loaded PixArt-α/Σ model: the transformer (VP, epsilon; its learned sigma dropped),
    the VAE, T5 and its tokenizer."""

    def __init__(self, folder: PixArtFolder, transformer: Any, vae: Any, text_encoder: Any,
                 tokenizer: Any) -> None:  # fmt: skip
        super().__init__(folder, transformer)
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.prompts = PromptEmbeddings(self._encode, [text_encoder])

    def forward(self, x_in: torch.Tensor, t: torch.Tensor, **inputs: torch.Tensor
                ) -> torch.Tensor:  # fmt: skip
        out = self.transformer(x_in, timestep=t, added_cond_kwargs=self._size(x_in),
                               **inputs, return_dict=False)[0]  # fmt: skip
        if self.folder.learned_sigma:
            return mean_channels(self, out, keep_variance=self.folder.learned_variance)
        return out

    def _size(self, x_in: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """``added_cond_kwargs``: the image's (height, width) in pixels and height / width,
        for a transformer that takes them (PixArt-α 1024 px), as the α pipeline makes them."""
        if not self.folder.size_conditions:
            return {"resolution": None, "aspect_ratio": None}
        # the size sampled (a binned request's table entry), as the pipeline hands it
        _, height, width = self.folder.sample_shape
        height, width = height * self.folder.vae_scale_factor, width * self.folder.vae_scale_factor
        batch, dtype = x_in.shape[0], self.dtype
        resolution = torch.tensor([height, width], dtype=dtype, device=x_in.device)
        aspect = torch.tensor([float(height / width)], dtype=dtype, device=x_in.device)
        return {"resolution": resolution.repeat(batch, 1), "aspect_ratio": aspect.repeat(batch, 1)}

    def conditioning(self, batch: Sequence[SampleRequest],
                     text_branches: Mapping[str, str]) -> TextConditioning:  # fmt: skip
        return TextConditioning.of(self.embed, batch, text_branches)

    def embed(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The transformer's ``encoder_hidden_states`` ``[B, L, D]`` and
        ``encoder_attention_mask`` ``[B, L]`` (1 on the prompt's tokens, 0 on padding) for
        `prompts`; each distinct prompt goes through T5 once per model (cached)."""
        return self.prompts(prompts)

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        captions = preprocess(self.folder.pipeline, prompts)
        length = self.folder.max_length
        tokens = self.tokenizer(captions, padding="max_length", max_length=length,
                                truncation=True, add_special_tokens=True,
                                return_tensors="pt")  # fmt: skip
        warn_truncated(self.tokenizer, captions, length)
        device = self.text_encoder.device
        mask = tokens.attention_mask.to(device)
        hidden = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return {"encoder_hidden_states": hidden.to(self.text_encoder.dtype),
                "encoder_attention_mask": mask}  # fmt: skip

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]: ``vae.decode(latents / scaling_factor)``; a binned
        request's images resized and center-cropped to the size asked, with the pipeline's
        own resizing (``PixArtImageProcessor.resize_and_crop_tensor``)."""
        images = decode_latents(self.vae, latents)
        if self.folder.binned_size is None or self.folder.image_size is None:
            return images
        from diffusers.image_processor import PixArtImageProcessor

        height, width = self.folder.image_size
        return PixArtImageProcessor.resize_and_crop_tensor(images, width, height)


def preprocess(pipeline: str, prompts: Sequence[str]) -> list[str]:
    """`prompts` as the pipeline's ``_text_preprocessing`` makes them with its default
    ``clean_caption=True``: its caption cleaning where ``bs4`` and ``ftfy`` are installed
    (the pipeline's own code, run on an instance that holds nothing), else what the pipeline
    falls back to, ``prompt.lower().strip()``."""
    import diffusers
    from diffusers.utils import is_bs4_available, is_ftfy_available

    if not (is_bs4_available() and is_ftfy_available()):
        return [prompt.lower().strip() for prompt in prompts]
    holder = object.__new__(getattr(diffusers, pipeline))  # only its regexes are read
    return holder._text_preprocessing(list(prompts), clean_caption=True)
