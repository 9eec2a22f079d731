"""The ``diffusers`` sampler (`plugins.samplers.diffusers_adapter`) on tiny random folders.

* Without ``scheduler=`` it runs the class the folder's scheduler config names, and gives
  what that scheduler gives in diffusers' own loop.
* Every diffusers scheduler class is either run with per-sample noise (the same seed gives
  the same image, whatever the run and the batch) or refused with one line saying why.
* UniPC ``bh1`` ends finite, as our ``unipc variant=bh1``.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import diffusers
import pytest
import torch
from click.testing import CliRunner
from sampling_helpers import sample_requests
from tiny_models import save_pipeline

import toolkit
from plugins.samplers.diffusers_adapter import REFUSED, SUPPORTED, DiffusersScheduler
from toolkit.cli import cli
from toolkit.errors import DtkError, OptionError
from toolkit.models import Model, load_model
from toolkit.sampling.engine import sample_images

# diffusers' KDPM2 schedulers call numpy on torch tensors (numpy 2 deprecation, not ours)
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning"),
    # the noise-prediction DPM-Solver variants: deprecated in diffusers, still run
    pytest.mark.filterwarnings("ignore:`algorithm_types dpmsolver:FutureWarning"),
]

STEPS = 6
SEEDS = [3, 4, 5]
#: batch size changes float summation order in the UNet's kernels (measured up to 2e-5 in
#: [0, 1] image units); 1e-4 is 0.03 of a pixel level, and a wrong noise stream moves
#: pixels by tenths
BATCH_TOL = 1e-4

# SD 1.5's scheduler folder: PNDM, as its model_index.json names it
PNDM = {"_class_name": "PNDMScheduler", "skip_prk_steps": True, "steps_offset": 1,
        "set_alpha_to_one": False}  # fmt: skip
EULER = {"_class_name": "EulerDiscreteScheduler"}


def with_scheduler(folder: pathlib.Path, changes: dict[str, Any]) -> pathlib.Path:
    """A DDPMPipeline folder whose scheduler config (and model_index.json) name another
    class, as a folder saved with that scheduler has them."""
    save_pipeline(folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, **changes}))
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index["scheduler"] = ["diffusers", changes["_class_name"]]
    index_file.write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: Any) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("adapter")
    return {
        "ddpm": save_pipeline(root / "ddpm"),
        "pndm": with_scheduler(root / "pndm", PNDM),
        "euler": with_scheduler(root / "euler", EULER),
    }


@pytest.fixture(scope="module")
def denoisers(folders: dict[str, pathlib.Path]) -> dict[str, Model]:
    return {name: load_model(path) for name, path in folders.items()}


def sample(model: Model, sampler: Any, seeds: list[int], steps: int = STEPS) -> Any:
    sigmas = toolkit.schedule("leading")(steps, model.noise_levels)  # unused by the adapter
    return sample_images(model, sampler, toolkit.guidance("none"), sigmas, sample_requests(seeds))


def diffusers_loop(denoiser: Model, seeds: list[int], steps: int = STEPS) -> Any:
    """The scheduler the folder's config names, in diffusers' standard loop, from our
    per-sample starting noise (deterministic schedulers only)."""
    config = denoiser.scheduler_config
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    scheduler.set_timesteps(steps)
    shape = denoiser.sample_shape
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
    x = torch.stack(noise) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = denoiser.unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(eps, t, x).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


# -- 1. without scheduler=, the folder's own scheduler -------------------------------------


@pytest.mark.parametrize("folder", ["pndm", "euler"])
def test_without_scheduler_the_folders_own_scheduler_runs(denoisers, folder):
    denoiser = denoisers[folder]
    name = denoiser.scheduler_config["_class_name"]
    own = sample(denoiser, DiffusersScheduler(), SEEDS)
    named = sample(denoiser, DiffusersScheduler(scheduler=name), SEEDS)
    assert torch.equal(own, named)
    # and that is what diffusers computes with that scheduler (measured 4e-6 and 7e-6)
    assert (own - diffusers_loop(denoiser, SEEDS)).abs().max() <= 1e-4
    # the comparison has teeth: DDIM (the old default) gives other images
    ddim = sample(denoiser, DiffusersScheduler(scheduler="DDIMScheduler"), SEEDS)
    assert (own - ddim).abs().max() > 10 / 255


def test_without_a_scheduler_config_ddim_runs(denoisers):
    adapter = DiffusersScheduler()

    class Bare:  # a denoiser with the model's noise levels but no scheduler config
        noise_levels = denoisers["ddpm"].noise_levels
        scheduler_config = None

    assert adapter.resolve_class(Bare()) is diffusers.DDIMScheduler
    Bare.scheduler_config = {"num_train_timesteps": 1000}  # a config that names no class
    assert adapter.resolve_class(Bare()) is diffusers.DDIMScheduler


class ConfiguredDenoiser:
    """A denoiser that carries a (raw) scheduler config, as `GuidedDenoiser` does."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.scheduler_config = config
        self.noise_levels = toolkit.NoiseLevels.from_scheduler_config(config)

    def __call__(self, x: torch.Tensor, sigma: Any) -> torch.Tensor:
        return x / (1 + float(sigma) ** 2)


def test_a_config_naming_a_refused_scheduler_is_refused_in_one_line():
    # (the loader refuses flow-matching folders itself; a config may still name any class)
    denoise = ConfiguredDenoiser({"_class_name": "FlowMatchEulerDiscreteScheduler"})
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(OptionError, match="names FlowMatchEulerDiscreteScheduler, which is for "
                       "rectified-flow") as caught:  # fmt: skip
        DiffusersScheduler()(denoise, x, [14.6, 0.0], noise=lambda s, t: torch.randn_like(x))
    assert "\n" not in str(caught.value)


# -- 2 and 4. every class: per-sample reproducible, or refused -----------------------------

ALL_SCHEDULERS = sorted(
    n for n in dir(diffusers) if n.endswith("Scheduler") and isinstance(getattr(diffusers, n), type)
)
#: stochastic configurations of accepted classes (their noise comes from step())
STOCHASTIC = [
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("DPMSolverMultistepScheduler",
     {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}),
    ("DPMSolverSinglestepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("DDPMScheduler", {"variance_type": "fixed_large"}),
]  # fmt: skip
CASES = [
    pytest.param(name, options, id="-".join([name, *(f"{k}={v}" for k, v in options.items())]))
    for name, options in [(name, {}) for name in ALL_SCHEDULERS] + STOCHASTIC
]


@pytest.mark.parametrize("name, options", CASES)
def test_every_scheduler_is_per_sample_reproducible_or_refused(denoisers, name, options):
    try:
        adapter = DiffusersScheduler(scheduler=name, **options)
    except OptionError as exc:
        assert name not in SUPPORTED
        message = str(exc)
        assert message.startswith(name) and "\n" not in message, message
        return
    assert name in SUPPORTED
    denoiser = denoisers["ddpm"]
    first = sample(denoiser, adapter, SEEDS)
    second = sample(denoiser, adapter, SEEDS)
    alone = [sample(denoiser, adapter, [seed]) for seed in SEEDS]
    assert bool(first.isfinite().all())
    assert torch.equal(first, second), "the same seeds gave other images on a second run"
    for k in range(len(SEEDS)):
        err = float((first[k] - alone[k][0]).abs().max())
        assert err <= BATCH_TOL, f"sample {k} changes with the batch by {err:.3g}"


def test_every_diffusers_scheduler_is_accounted_for():
    """Each class is run (`SUPPORTED`) or refused with a reason (`REFUSED`); a class a new
    diffusers adds is refused as unchecked until someone checks it."""
    assert not SUPPORTED & REFUSED.keys()
    assert set(ALL_SCHEDULERS) <= SUPPORTED | REFUSED.keys()


def test_brownian_tree_sde_points_to_our_twin():
    with pytest.raises(OptionError, match=r"Brownian tree .* use --sampler dpmpp_sde"):
        DiffusersScheduler(scheduler="DPMSolverSDEScheduler")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"scheduler": "NoSuchScheduler"}, "diffusers has no scheduler 'NoSuchScheduler'"),
        ({"scheduler": "DDIMScheduler", "prediction_type": "v_prediction"}, "is the model's"),
        ({"scheduler": "DDIMScheduler", "beta_schedule": "linear"}, "is the model's"),
        ({"scheduler": "UniPCMultistepScheduler", "use_flow_sigmas": True}, "rectified-flow"),
        ({"scheduler": "DDIMScheduler", "solver_order": 2}, "has no config option"),
    ],
)
def test_bad_options_are_refused_at_once(options, message):
    with pytest.raises(OptionError, match=message):
        DiffusersScheduler(**options)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"scheduler": "DDPMScheduler", "variance_type": "learned"},
         "needs the model's predicted variance"),
        ({"scheduler": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"},
         "final_sigmas_type"),
        ({"scheduler": "EulerDiscreteScheduler", "timestep_spacing": "bogus"}, "bogus"),
    ],
)  # fmt: skip
def test_configurations_diffusers_cannot_run_are_one_line_errors(denoisers, options, message):
    with pytest.raises(DtkError, match=message) as caught:
        sample(denoisers["ddpm"], DiffusersScheduler(**options), SEEDS[:1])
    assert "\n" not in str(caught.value)


def test_the_cli_refuses_a_flow_scheduler_in_one_line(folders, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [
        "generate", "--model", str(folders["ddpm"]), "-n", "1", "--steps", "2",
        "--sampler", "diffusers", "--sampler-option", "scheduler=FlowMatchEulerDiscreteScheduler",
        "--out", str(out), "-q",
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "FlowMatchEulerDiscreteScheduler is for rectified-flow" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


# -- 3. UniPC bh1 ---------------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_bh1_ends_finite_and_equals_our_unipc(denoisers, order):
    """diffusers' bh1 adds ``B(h) * 0 = -inf * 0`` on its last step to sigma 0; the adapter
    keeps that step's exact value, the data prediction (see `_FinalStep`). Our ``unipc
    variant=bh1`` on the same sigmas (``linspace variant=dpmsolver``) must agree."""
    denoiser = denoisers["ddpm"]
    adapter = DiffusersScheduler(scheduler="UniPCMultistepScheduler", solver_type="bh1",
                                 solver_order=order, timestep_spacing="linspace")  # fmt: skip
    theirs = sample(denoiser, adapter, SEEDS)  # (the adapter takes no schedule)
    assert bool(theirs.isfinite().all())
    ours = toolkit.sampler("unipc", variant="bh1", order=order)
    sigmas = toolkit.schedule("linspace", variant="dpmsolver")(STEPS, denoiser.noise_levels)
    native = sample_images(denoiser, ours, toolkit.guidance("none"), sigmas, sample_requests(SEEDS))
    # measured 4e-6: both evaluate the UNet at the same integer timesteps
    assert (theirs - native).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "options",
    [{"lower_order_final": False}, {"predict_x0": False}],
    ids=["lower_order_final=false", "predict_x0=false"],
)
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
def test_unipc_without_a_finite_last_step_is_refused(denoisers, options, solver_type):
    adapter = DiffusersScheduler(scheduler="UniPCMultistepScheduler", solver_type=solver_type,
                                 **options)  # fmt: skip
    with pytest.raises(OptionError, match=r"sigma 0.*final_sigmas_type=sigma_min"):
        sample(denoisers["ddpm"], adapter, SEEDS[:1])
    # with the last step to the first training sigma instead, it runs
    adapter = DiffusersScheduler(scheduler="UniPCMultistepScheduler", solver_type=solver_type,
                                 final_sigmas_type="sigma_min", **options)  # fmt: skip
    assert bool(sample(denoisers["ddpm"], adapter, SEEDS[:1]).isfinite().all())
