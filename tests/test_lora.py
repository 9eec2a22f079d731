"""LoRA adapters (``--lora PATH[:SCALE]``, `GenerationSettings.loras`) on tiny random
folders, with tiny LoRAs built offline here (peft adapters with random weights, saved by
the pipeline's ``save_lora_weights``): ``dtk generate --lora`` equals the pipeline after
``load_lora_weights`` and ``set_adapters`` with the same scales, one LoRA or two combined,
on SD and on SDXL, SD 3 and Flux; LoRAs are recorded (path, scale, sha256) and part of the
run's identity; bad paths, scales and files are refused in one line before weights load."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pandas
import pytest
import torch
from diffusers import (
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils import convert_state_dict_to_diffusers
from folders import capture_decoded, max_pixel_difference, pixels, prompts_file
from invoke import dtk
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from tiny_flux import save_flux_pipeline
from tiny_models import save_pipeline
from tiny_sd import save_sd_pipeline
from tiny_sd3 import save_sd3_pipeline
from tiny_sdxl import save_sdxl_pipeline

import toolkit
from toolkit.models.lora import parse_lora
from toolkit.models.stable_diffusion import StableDiffusionFolder

#: the reference pipelines load several adapters into one network, as asked
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")

CAT, DOG, NEG = "a photo of a cat", "a red dog", "blurry"
#: latents of two float32 runs of the same math, in different orders
LATENT_TOL = 1e-4
PIPELINES = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline,
             "sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}  # fmt: skip
#: what from_pretrained needs besides the folder
EXTRA = {"sdxl": {"add_watermarker": False}, "sd3": {"text_encoder_3": None, "tokenizer_3": None}}
#: each family's sampler that steps as its folder's scheduler (the tiny_*.py folders), and
#: a small size and prompt length for Flux
ARGS = {
    "sd": ["--sampler", "ddim", "--schedule", "leading", "--schedule-option", "offset=1"],
    "sdxl": ["--sampler", "euler", "--schedule", "leading", "--schedule-option", "offset=1"],
    "sd3": ["--sampler", "euler", "--schedule", "flow"],
    "flux": ["--height", 32, "--width", 48, "--model-option", "max_sequence_length=32"],
}
CALL = {"flux": {"height": 32, "width": 48, "max_sequence_length": 32}}
DENOISER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def load(family, folder):
    pipe = PIPELINES[family].from_pretrained(folder, **EXTRA.get(family, {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_lora(family, folder, path: pathlib.Path, *, seed: int, text_encoder: bool = True,
              rank: int = 4, alpha: int = 8) -> pathlib.Path:  # fmt: skip
    """A LoRA of `folder`'s denoiser (attention projections) and, with `text_encoder`, of
    its first text encoder: peft adapters whose weights are drawn at random, saved as the
    pipeline's save_lora_weights writes them (with their adapter metadata)."""
    pipe = load(family, folder)
    denoiser = "unet" if family in ("sd", "sdxl") else "transformer"
    parts = [(denoiser, DENOISER_TARGETS)] + ([("text_encoder", TEXT_TARGETS)] * text_encoder)
    torch.manual_seed(seed)
    layers = {}
    for part, targets in parts:
        network = getattr(pipe, part)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
        # peft itself: transformers' add_adapter asks for a newer peft than PyPI has
        network = inject_adapter_in_model(config, network)
        with torch.no_grad():
            for name, parameter in network.named_parameters():
                if "lora_" in name:
                    parameter.normal_(0, 0.1)
        layers[f"{part}_lora_layers"] = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(network))  # fmt: skip
        layers[f"{part}_lora_adapter_metadata"] = config.to_dict()
    PIPELINES[family].save_lora_weights(path.parent, weight_name=path.name, **layers)
    return path


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    folder = save_sd_pipeline(root / "sd")
    return {"folder": folder,
            "a": save_lora("sd", folder, root / "loras" / "a.safetensors", seed=1),
            "b": save_lora("sd", folder, root / "loras" / "b.safetensors", seed=2,
                           text_encoder=False, rank=2, alpha=2)}  # fmt: skip


@pytest.fixture
def decoded(monkeypatch):
    """The latents every run decodes (any family), in order."""
    from toolkit.models import flux, sd3, sdxl, stable_diffusion

    return capture_decoded(monkeypatch, stable_diffusion.StableDiffusion, sdxl.StableDiffusionXL,
                           sd3.StableDiffusion3, flux.Flux)  # fmt: skip


def pipeline(family, folder, loras, seed, *, output_type="np", **kwargs):
    """The pipeline with `loras` ((path, scale) pairs) loaded as adapters and combined by
    set_adapters; two prompts, one generator per sample; its images (as our pixels) or
    latents."""
    pipe = load(family, folder)
    names = []
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(path.parent, weight_name=path.name, adapter_name=f"l{i}")
        names.append(f"l{i}")
    if names:
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(2)]
    out = pipe([CAT, DOG], generator=generators, output_type=output_type,
               **CALL.get(family, {}), **kwargs)  # fmt: skip
    if output_type == "latent":
        if family == "flux":
            size = CALL["flux"]
            return FluxPipeline._unpack_latents(out.images, size["height"], size["width"],
                                                pipe.vae_scale_factor)  # fmt: skip
        return out.images
    return np.round(out.images * 255).astype(np.int16)


def generate(family, folder, tmp_path, out, *args):
    negative = family != "flux"  # Flux takes a negative prompt under cfg only
    prompts = prompts_file(tmp_path, CAT, DOG, negative=NEG if negative else None)
    result = dtk("generate", "--model", folder, "--prompts-file", prompts,
                 *ARGS[family], "--steps", 3, "--seed", 3, *args, "--out", out,
                 "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    return result


def sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_lora_at_a_scale_equals_the_pipelines_load_lora_weights(sd, tmp_path, decoded):
    """--lora a.safetensors:0.7 (UNet and text encoder) is the pipeline's
    load_lora_weights + set_adapters(..., 0.7), and differs from the run without it."""
    out = tmp_path / "out"
    generate("sd", sd["folder"], tmp_path, out, "--lora", f"{sd['a']}:0.7")
    [ours] = decoded
    kwargs = dict(negative_prompt=[NEG] * 2, num_inference_steps=3)
    theirs = pipeline("sd", sd["folder"], [(sd["a"], 0.7)], 3, output_type="latent", **kwargs)
    assert float((ours - theirs).abs().max()) <= LATENT_TOL
    reference = pipeline("sd", sd["folder"], [(sd["a"], 0.7)], 3, **kwargs)
    assert max_pixel_difference(pixels(out), reference) <= 1
    # the LoRA matters, and so does its scale
    plain = pipeline("sd", sd["folder"], [], 3, **kwargs)
    assert max_pixel_difference(pixels(out), plain) > 4
    full = pipeline("sd", sd["folder"], [(sd["a"], 1.0)], 3, output_type="latent", **kwargs)
    assert float((ours - full).abs().max()) > 100 * LATENT_TOL
    run = json.loads((out / "run.json").read_text())
    assert run["loras"] == [{"path": str(sd["a"].resolve()), "scale": 0.7,
                             "sha256": sha256(sd["a"])}]  # fmt: skip
    metadata = pandas.read_csv(out / "metadata.csv")
    assert json.loads(metadata["loras"][0]) == run["loras"]


def test_two_loras_combine_with_their_scales(sd, tmp_path, decoded):
    """Two --lora (the second a UNet-only LoRA of another rank, scale 1 by default) are the
    pipeline's two adapters under set_adapters([a, b], [0.7, 1.0])."""
    out = tmp_path / "out"
    generate("sd", sd["folder"], tmp_path, out, "--lora", f"{sd['a']}:0.7", "--lora", sd["b"])
    [ours] = decoded
    loras = [(sd["a"], 0.7), (sd["b"], 1.0)]
    kwargs = dict(negative_prompt=[NEG] * 2, num_inference_steps=3)
    theirs = pipeline("sd", sd["folder"], loras, 3, output_type="latent", **kwargs)
    assert float((ours - theirs).abs().max()) <= LATENT_TOL
    assert max_pixel_difference(pixels(out), pipeline("sd", sd["folder"], loras, 3, **kwargs)) <= 1
    one = pipeline("sd", sd["folder"], loras[:1], 3, output_type="latent", **kwargs)
    assert float((ours - one).abs().max()) > 100 * LATENT_TOL
    run = json.loads((out / "run.json").read_text())
    assert [(lora["path"], lora["scale"]) for lora in run["loras"]] == [
        (str(sd["a"].resolve()), 0.7), (str(sd["b"].resolve()), 1.0)]  # fmt: skip


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_the_other_families_load_loras_as_their_pipelines(tmp_path, decoded, family):
    """A LoRA of the denoiser and the first text encoder at scale 0.6, with a second one of
    the denoiser alone at 1.5, on SDXL, SD 3 and Flux (dev): the pipeline's adapters."""
    saves = {"sdxl": save_sdxl_pipeline, "sd3": save_sd3_pipeline, "flux": save_flux_pipeline}
    folder = saves[family](tmp_path / family)
    a = save_lora(family, folder, tmp_path / "loras" / "a.safetensors", seed=1)
    b = save_lora(family, folder, tmp_path / "loras" / "b.safetensors", seed=2,
                  text_encoder=False)  # fmt: skip
    generate(family, folder, tmp_path, tmp_path / "out", "--lora", f"{a}:0.6", "--lora",
             f"{b}:1.5")  # fmt: skip
    [ours] = decoded
    kwargs = {"num_inference_steps": 3}
    if family != "flux":
        kwargs["negative_prompt"] = [NEG] * 2
    theirs = pipeline(family, folder, [(a, 0.6), (b, 1.5)], 3, output_type="latent", **kwargs)
    assert float((ours - theirs).abs().max()) <= LATENT_TOL
    assert max_pixel_difference(pixels(tmp_path / "out"),
                                pipeline(family, folder, [(a, 0.6), (b, 1.5)], 3,
                                         **kwargs)) <= 1  # fmt: skip
    plain = pipeline(family, folder, [], 3, output_type="latent", **kwargs)
    assert float((ours - plain).abs().max()) > 100 * LATENT_TOL


def test_a_folder_resumes_only_with_the_same_loras(sd, tmp_path):
    out = tmp_path / "out"
    args = ["generate", "--model", sd["folder"], "--prompt", CAT, "--steps", 1, "--out", out,
            "-q"]  # fmt: skip
    assert dtk(*args, "-n", 1, "--lora", f"{sd['a']}:0.7").exit_code == 0
    assert dtk(*args, "-n", 2, "--lora", f"{sd['a']}:0.7").exit_code == 0  # resumed
    assert len(pandas.read_csv(out / "metadata.csv")) == 2
    for other in (["--lora", f"{sd['a']}:0.5"], ["--lora", sd["b"]], []):
        result = dtk(*args, "-n", 3, *other)
        assert result.exit_code == 2, result.output
        [line] = result.stderr.splitlines()
        assert "holds a different run (differing in loras)" in line, line


@pytest.fixture
def no_load(monkeypatch):
    """A refusal must come before any weights load."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(StableDiffusionFolder, "load", refuse)


def test_bad_loras_are_one_line_before_any_weights(sd, tmp_path, no_load):
    root = tmp_path / "files"
    root.mkdir()
    (root / "pickled.bin").write_bytes(b"not really")
    (root / "garbage.safetensors").write_bytes(b"\x00" * 64)
    whole = sd["folder"] / "unet" / "diffusion_pytorch_model.safetensors"
    cases = [
        (root / "missing.safetensors", "--lora {root}/missing.safetensors does not exist"),
        (root, f"--lora {root} is a folder, not a LoRA file"),
        (f"{sd['a']}:abc", "the scale 'abc' is not a number (give PATH[:SCALE])"),
        (f"{sd['a']}:nan", "the scale nan is not a finite number"),
        (f"{sd['a']}:inf", "is not a finite number"),
        (root / "pickled.bin", "is not a .safetensors file, and unpickling can run arbitrary "
         "code; convert it to safetensors, or pass --trust-pickle"),
        (root / "garbage.safetensors", "is not a safetensors file (its header does not read)"),
        (whole, "holds no LoRA weights (none of its"),
    ]  # fmt: skip
    for lora, message in cases:
        out = tmp_path / "out"
        result = dtk("generate", "--model", sd["folder"], "--prompt", CAT, "-n", 1,
                     "--lora", lora, "--out", out)  # fmt: skip
        assert result.exit_code == 2, (lora, result.output)
        [line] = result.stderr.splitlines()
        assert message.format(root=root) in line, line
        assert not out.exists()
    twice = dtk("generate", "--model", sd["folder"], "--prompt", CAT, "-n", 1, "--lora",
                sd["a"], "--lora", f"{sd['a']}:0.5", "--dry-run")  # fmt: skip
    assert twice.exit_code == 2 and "is given twice" in twice.stderr


def test_the_dry_run_shows_the_loras(sd):
    result = dtk("generate", "--model", sd["folder"], "--prompt", CAT, "-n", 1, "--lora",
                 f"{sd['a']}:0.7", "--lora", sd["b"], "--dry-run")  # fmt: skip
    assert result.exit_code == 0, result.output
    listed = (f"loras     a.safetensors (scale 0.7, sha256 {sha256(sd['a'])[:12]}), "
              f"b.safetensors (scale 1, sha256 {sha256(sd['b'])[:12]})")  # fmt: skip
    assert listed in result.stdout


def test_families_without_lora_loading_refuse_it(sd, tmp_path):
    folder = save_pipeline(tmp_path / "unet")
    result = dtk("generate", "--model", folder, "-n", 1, "--lora", sd["a"], "--dry-run")
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert "a unet model takes no LoRA; --lora applies to Stable Diffusion 1.x/2.x" in line


def test_a_lora_for_another_model_is_one_line_at_load(sd, tmp_path):
    """A UNet LoRA on an SD 3 folder (a transformer): no weights fit, refused before any
    image is sampled."""
    folder = save_sd3_pipeline(tmp_path / "sd3")
    out = tmp_path / "out"
    result = dtk("generate", "--model", folder, "--prompt", CAT, "-n", 1, "--steps", 1,
                 "--lora", sd["b"], "--out", out)  # fmt: skip
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert "none of its weights fit this sd3 model's networks" in line, line


def test_loras_from_python(sd, tmp_path):
    """toolkit.generate takes (path, scale) pairs, "PATH[:SCALE]" strings or paths."""
    assert parse_lora(f"{sd['a']}:0.25") == (sd["a"], 0.25)
    assert parse_lora(sd["a"]) == (sd["a"], 1.0)
    assert parse_lora((str(sd["a"]), 2)) == (sd["a"], 2)
    assert parse_lora({"path": sd["a"], "scale": 0.5}) == (sd["a"], 0.5)
    metadata = toolkit.generate(sd["folder"], out=tmp_path / "out", prompt=CAT, n=1, steps=1,
                                loras=[(sd["a"], 0.7)], progress=False)  # fmt: skip
    assert json.loads(metadata["loras"][0])[0]["scale"] == 0.7
