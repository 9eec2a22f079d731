"""Step caches (``plugins/step_caches.py``, `toolkit.sampling.step_cache`): ``deepcache``
equals DeepCache's own ``DeepCacheSDHelper`` on a tiny Stable Diffusion folder, and
``first_block_cache`` diffusers' ``apply_first_block_cache`` on a tiny Flux folder; the
caches keep every sample independent of its batch, never cross batches, put the network
back, and are refused in one line where they cannot work."""

from __future__ import annotations

import json

import pytest
import torch
from folders import capture_decoded, max_pixel_difference, pixels
from invoke import dtk

import toolkit
from toolkit.models.blocks import unet_layers
from toolkit.sampling.step_cache import CacheRuns

CAT, DOG, NEG = "a photo of a cat", "a red dog", "blurry"
#: latents of two float32 runs of the same math, in different orders
LATENT_TOL = 1e-4
DDIM = dict(sampler="ddim", schedule="leading", schedule_options={"offset": 1}, progress=False)


def start(seed: int, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed + i))
                        for i in range(n)])  # fmt: skip


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from tiny_sd import save_sd_pipeline

    return save_sd_pipeline(tmp_path_factory.mktemp("models") / "sd")


@pytest.fixture
def decoded(monkeypatch):
    """The latents each of our runs decodes, in order."""
    from toolkit.models.dit import DiT
    from toolkit.models.flux import Flux
    from toolkit.models.stable_diffusion import StableDiffusion

    return capture_decoded(monkeypatch, StableDiffusion, Flux, DiT)


@pytest.fixture
def computed(monkeypatch):
    """How often each diffusers module class really computed (its class forward ran)."""
    import diffusers.models.transformers.transformer_flux as flux
    from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn

    counts: dict[str, int] = {}
    for cls in (UNetMidBlock2DCrossAttn, flux.FluxTransformerBlock,
                flux.FluxSingleTransformerBlock):  # fmt: skip

        def forward(self, *args, _forward=cls.forward, **kwargs):
            counts[type(self).__name__] = counts.get(type(self).__name__, 0) + 1
            return _forward(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", forward)
    return counts


# -- DeepCache ------------------------------------------------------------------------------


def deepcache_reference(folder, prompts, seed, steps, interval, branch):
    """StableDiffusionPipeline with DDIM and DeepCache's helper: the latents it decodes."""
    from DeepCache import DeepCacheSDHelper
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        latents = start(seed, len(prompts), (4, 8, 8))
        out = pipe(prompts, negative_prompt=[NEG] * len(prompts), num_inference_steps=steps,
                   guidance_scale=7.5, latents=latents, output_type="latent")  # fmt: skip
    finally:
        helper.disable()
    return out.images


@pytest.mark.parametrize("interval, branch", [(3, 0), (2, 4)])
def test_deepcache_equals_deepcaches_helper(sd, tmp_path, decoded, computed, interval, branch):
    """Two prompts under CFG 7.5 in one batch, 7 DDIM steps: our deepcache gives the
    latents of StableDiffusionPipeline with DeepCacheSDHelper at the same interval and
    branch, and only the full calls run the mid block."""
    options = {"interval": interval, "branch": branch}
    toolkit.generate(sd, out=tmp_path / "cached", prompt=[CAT, DOG], negative_prompt=NEG, n=2,
                     seed=3, steps=7, step_cache="deepcache", step_cache_options=options,
                     **DDIM)  # fmt: skip
    assert computed["UNetMidBlock2DCrossAttn"] == len(range(0, 7, interval))
    theirs = deepcache_reference(sd, [CAT, DOG], 3, 7, interval, branch)
    difference = float((decoded[0] - theirs).abs().max())
    print(f"deepcache interval {interval} branch {branch}: latents {difference:.2e}")
    assert difference <= LATENT_TOL
    # the comparison has teeth: the cache changes the result
    toolkit.generate(sd, out=tmp_path / "plain", prompt=[CAT, DOG], negative_prompt=NEG, n=2,
                     seed=3, steps=7, **DDIM)  # fmt: skip
    assert float((decoded[1] - theirs).abs().max()) > 100 * LATENT_TOL


def test_deepcache_at_interval_1_is_no_cache(sd, tmp_path):
    common = dict(prompt=CAT, n=2, seed=5, steps=4, **DDIM)
    toolkit.generate(sd, out=tmp_path / "plain", **common)
    toolkit.generate(sd, out=tmp_path / "one", step_cache="deepcache",
                     step_cache_options={"interval": 1}, **common)  # fmt: skip
    assert max_pixel_difference(pixels(tmp_path / "one"), pixels(tmp_path / "plain")) == 0


def test_deepcache_layers_pair_the_skip_connections(sd):
    """Up block b holds the layers that take down block b's skip connections, numbered from
    the output side, as DeepCache numbers them."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sd / "unet")
    layers = unet_layers(unet)
    last_up = unet.up_blocks[-1]
    assert ("up", 0, 0, last_up.resnets[-1]) in layers
    assert ("up", 0, len(last_up.resnets) - 1, last_up.resnets[0]) in layers
    assert ("down", 0, len(unet.down_blocks[0].resnets),
            unet.down_blocks[0].downsamplers[0]) in layers  # fmt: skip
    assert sum(kind == "mid" for kind, *_ in layers) == 1


# -- First Block Cache ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    from tiny_flux import save_flux_pipeline

    return save_flux_pipeline(tmp_path_factory.mktemp("flux") / "schnell", guidance=False)


FLUX_SIZE = {"height": 32, "width": 48, "max_sequence_length": 32}
FLUX_ARGS = dict(width=48, height=32, model_options={"max_sequence_length": 32},
                 sampler="euler", progress=False)  # fmt: skip
#: a threshold at which the tiny random Flux reuses on some calls and not others
THRESHOLD = 0.3


def fbc_reference(folder, prompt, seed, steps, threshold):
    """FluxPipeline with diffusers' First Block Cache: the unpacked latents it decodes."""
    from diffusers import FluxPipeline
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=threshold))
    out = pipe([prompt], generator=[torch.Generator("cpu").manual_seed(seed)],
               num_inference_steps=steps, output_type="latent", **FLUX_SIZE)  # fmt: skip
    return FluxPipeline._unpack_latents(out.images, 32, 48, pipe.vae_scale_factor)


def test_first_block_cache_equals_diffusers(flux, tmp_path, decoded, computed):
    """One sample (diffusers decides for the whole batch, we per row: equal for one), 8
    euler steps on the flow schedule: the latents of FluxPipeline with
    apply_first_block_cache at the same threshold, some calls reusing."""
    toolkit.generate(flux, out=tmp_path / "cached", prompt=CAT, n=1, seed=4, steps=8,
                     step_cache="first_block_cache",
                     step_cache_options={"threshold": THRESHOLD}, **FLUX_ARGS)  # fmt: skip
    # the first block runs on every call (one per euler step), the others on full calls
    full_calls = computed["FluxSingleTransformerBlock"] / _single_count(flux)
    assert computed["FluxTransformerBlock"] == 8 + full_calls * (_double_count(flux) - 1)
    assert 0 < full_calls < 8, computed
    theirs = fbc_reference(flux, CAT, 4, 8, THRESHOLD)
    difference = float((decoded[0] - theirs).abs().max())
    print(f"first_block_cache: latents {difference:.2e}, {full_calls:.0f} full calls of 8")
    assert difference <= LATENT_TOL
    toolkit.generate(flux, out=tmp_path / "plain", prompt=CAT, n=1, seed=4, steps=8,
                     **FLUX_ARGS)  # fmt: skip
    assert float((decoded[1] - theirs).abs().max()) > 100 * LATENT_TOL


def _flux_transformer(folder):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(folder / "transformer")


def _single_count(folder) -> int:
    return len(_flux_transformer(folder).single_transformer_blocks)


def _double_count(folder) -> int:
    return len(_flux_transformer(folder).transformer_blocks)


# -- the per-sample contract --------------------------------------------------------------------


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    from tiny_dit import save_dit_pipeline

    return save_dit_pipeline(tmp_path_factory.mktemp("dit") / "dit")


@pytest.fixture
def decisions(monkeypatch):
    """Every First Block Cache decision: the rows that ran the later blocks, per call."""
    from plugins.step_caches import _FirstBlockRun

    found: list[torch.Tensor] = []
    decide = _FirstBlockRun.decide
    monkeypatch.setattr(_FirstBlockRun, "decide",
                        lambda run, residual: found.append(decide(run, residual)) or found[-1]
                        )  # fmt: skip
    return found


def test_first_block_cache_decides_per_row(dit, tmp_path, decisions, decoded):
    """A DiT under CFG (rows: 3 samples x 2 branches), 10 steps, a threshold at which rows
    of one call decide differently: each sample's image is the one it gets alone, so the
    later blocks ran on just the rows that needed them."""
    common = dict(conditions=[{"class": str(k)} for k in (0, 1, 2)], n=3, seed=2, steps=10,
                  guidance="cfg", guidance_options={"scale": 4.0}, sampler="euler",
                  schedule="karras", step_cache="first_block_cache",
                  step_cache_options={"threshold": 0.2}, progress=False)  # fmt: skip
    toolkit.generate(dit, out=tmp_path / "together", batch_size=3, **common)
    # some calls ran the later blocks on some rows only
    assert [d for d in decisions if 0 < int(d.sum()) < len(d)], [d.tolist() for d in decisions]
    toolkit.generate(dit, out=tmp_path / "alone", batch_size=1, **common)
    together, alone = decoded[0], torch.cat(decoded[1:4])
    assert float((together - alone).abs().max()) <= LATENT_TOL
    assert max_pixel_difference(pixels(tmp_path / "together"), pixels(tmp_path / "alone")) <= 1
    # the cache mattered: without it the latents differ
    plain = {k: v for k, v in common.items() if not k.startswith("step_cache")}
    toolkit.generate(dit, out=tmp_path / "plain", batch_size=3, **plain)
    assert float((decoded[4] - together).abs().max()) > 100 * LATENT_TOL


def test_deepcache_keeps_samples_independent_of_their_batch(sd, tmp_path):
    common = dict(prompt=[CAT, DOG, CAT], negative_prompt=NEG, n=3, seed=8, steps=6,
                  step_cache="deepcache", **DDIM)  # fmt: skip
    toolkit.generate(sd, out=tmp_path / "three", batch_size=3, **common)
    toolkit.generate(sd, out=tmp_path / "two", batch_size=2, **common)
    assert max_pixel_difference(pixels(tmp_path / "three"), pixels(tmp_path / "two")) <= 1


class CountingCache:
    """A step cache that records when it is attached and left."""

    name = "counting"

    def __init__(self) -> None:
        self.events: list[str] = []

    def attach(self, network):
        import contextlib

        @contextlib.contextmanager
        def attached():
            self.events.append("attach")
            try:
                yield
            finally:
                self.events.append("leave")

        return attached()


def test_a_new_layout_of_rows_starts_the_cache_afresh():
    cache = CountingCache()
    with CacheRuns(cache, network=None) as runs:
        for layout in [("cond", "uncond"), ("cond", "uncond"), ("cond",), ("cond", "uncond")]:
            runs.before_call((layout, 2))
    assert cache.events == ["attach", "leave"] * 3
    with CacheRuns(None, network=None) as runs:  # no cache: nothing to do
        runs.before_call(("cond",))


def test_the_network_is_put_back_even_after_an_error(sd, monkeypatch, tmp_path):
    """After a run that fails mid-sampling, no module keeps a replaced forward."""
    from diffusers import UNet2DConditionModel

    seen = []
    original = UNet2DConditionModel.forward

    def failing(self, *args, **kwargs):
        seen.append(self)
        if len(seen) == 3:
            raise RuntimeError("boom")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", failing)
    with pytest.raises(RuntimeError, match="boom"):
        toolkit.generate(sd, out=tmp_path / "out", prompt=CAT, n=1, steps=5,
                         step_cache="deepcache", **DDIM)  # fmt: skip
    unet = seen[0]
    assert not [name for name, m in unet.named_modules() if "forward" in vars(m)]


# -- plans and records ----------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--step-cache", "deepcache", "--model", "FLUX"], "deepcache reuses a UNet's deep features"),
    (["--step-cache", "first_block_cache"], "has no list of transformer blocks; use deepcache"),
    (["--step-cache", "deepcache", "--step-cache-option", "branch=99"],
     "branch 99 is out of range"),
    (["--step-cache", "deepcache", "--step-cache-option", "interval=0"],
     "interval must be at least 1"),
    (["--step-cache", "first_block_cache", "--step-cache-option", "threshold=-1", "--model",
      "FLUX"], "threshold must be a number >= 0"),
    (["--step-cache-option", "interval=2"], "--step-cache-option needs --step-cache NAME"),
    (["--step-cache", "deepcache", "--compile"], "--step-cache and --compile do not go together"),
    (["--step-cache", "nocache"], "unknown step cache 'nocache'. Choose one of: deepcache"),
])  # fmt: skip
def test_a_cache_that_cannot_serve_is_refused_in_one_line(sd, flux, tmp_path, args, message):
    args = [str(flux) if a == "FLUX" else a for a in args]
    model = [] if "--model" in args else ["--model", str(sd)]
    result = dtk("generate", *model, "--prompt", CAT, "-n", 1, "--out", tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_run_json_and_metadata_record_the_cache_and_resuming_keeps_it(sd, tmp_path):
    out = tmp_path / "out"
    args = ["generate", "--model", sd, "--prompt", CAT, "-n", 2, "--steps", 3, "--out", out,
            "--step-cache", "deepcache", "--step-cache-option", "interval=2", "-q"]  # fmt: skip
    assert dtk(*args).exit_code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["step_cache"] == {"name": "deepcache", "options": {"interval": 2}}
    assert {"kind": "step_cache", "name": "deepcache"}.items() <= run["plugins"][-1].items()
    import pandas

    metadata = pandas.read_csv(out / "metadata.csv")
    assert set(metadata["step_cache"]) == {"deepcache"}
    assert json.loads(metadata["step_cache_options"][0]) == {"interval": 2}
    # the cache changes the images: another cache is another run
    other = dtk(*args[:-2], "interval=3", "-q")
    assert other.exit_code == 2 and "differing in step_cache" in other.stderr
    plain = dtk(*args[:-5], "-q")
    assert plain.exit_code == 2 and "differing in step_cache" in plain.stderr
    assert dtk(*args[:6], 3, *args[7:]).exit_code == 0  # the same run grown to 3
    assert len(pandas.read_csv(out / "metadata.csv")) == 3
    assert sorted(pixels(out)) == [0, 1, 2]
