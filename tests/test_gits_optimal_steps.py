"""``gits`` and ``optimal_steps`` (`plugins.comfy_schedules`) against ComfyUI's
``GITSScheduler`` and ``OptimalStepsScheduler`` nodes.

ComfyUI cannot be installed here, so the reference below restates the two nodes' ``execute``
(``comfy_extras/nodes_gits.py``, ``comfy_extras/nodes_optimalsteps.py``) as ComfyUI computes
them: its ``loglinear_interp`` in numpy, the table choice, the last level set to 0, and a
float32 ``torch.FloatTensor``. The tables they read are our `plugins.schedule_tables`, which
are checked apart against values copied from the node files by hand.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import toolkit
from plugins.schedule_tables import GITS_LEVELS, OPTIMAL_STEPS_LEVELS
from toolkit.models.noise import FlowLevels

#: relative: ComfyUI returns float32, we float64
TOL = 1e-4
COEFFS = [round(0.80 + 0.05 * i, 2) for i in range(15)]
#: within the GITS tables (2 .. 20), and beyond them, interpolated
GITS_STEPS = (2, 3, 7, 10, 19, 20, 21, 25, 40, 100)
#: the node's own count for each table (10, 20, 40), others interpolated
OPTIMAL_STEPS = (3, 4, 7, 10, 15, 20, 30, 40, 50, 100)
#: the node's names for our `model` option
COMFY_MODEL = {"flux": "FLUX", "wan": "Wan", "chroma": "Chroma"}


# -- the nodes, as ComfyUI computes them ----------------------------------------------------


def comfy_loglinear_interp(t_steps, num_steps):
    xs = np.linspace(0, 1, len(t_steps))
    ys = np.log(t_steps[::-1])
    new_xs = np.linspace(0, 1, num_steps)
    new_ys = np.interp(new_xs, xs, ys)
    return np.exp(new_ys)[::-1].copy()


def comfy_gits(coeff, steps, denoise=1.0):
    """``GITSScheduler.execute``; NOISE_LEVELS as the node holds it, lists of lists."""
    noise_levels = {key: [list(row) for row in rows] for key, rows in GITS_LEVELS.items()}
    total_steps = steps
    if denoise < 1.0:
        total_steps = round(steps * denoise)
    if steps <= 20:
        sigmas = noise_levels[round(coeff, 2)][steps - 2][:]
    else:
        sigmas = noise_levels[round(coeff, 2)][-1][:]
        sigmas = comfy_loglinear_interp(sigmas, steps + 1)
    sigmas = sigmas[-(total_steps + 1) :]
    sigmas[-1] = 0
    return torch.FloatTensor(sigmas)


def comfy_optimal_steps(model_type, steps, denoise=1.0):
    """``OptimalStepsScheduler.execute``: ComfyUI's "sigmas" of a flow model, times ``t``."""
    noise_levels = {COMFY_MODEL[key]: list(levels) for key, levels in OPTIMAL_STEPS_LEVELS.items()}
    total_steps = steps
    if denoise < 1.0:
        total_steps = round(steps * denoise)
    sigmas = noise_levels[model_type][:]
    if (steps + 1) != len(sigmas):
        sigmas = comfy_loglinear_interp(sigmas, steps + 1)
    sigmas = sigmas[-(total_steps + 1) :]
    sigmas[-1] = 0
    return torch.FloatTensor(sigmas)


# -- helpers ---------------------------------------------------------------------------------


def vp_levels() -> toolkit.NoiseLevels:
    return toolkit.NoiseLevels.from_scheduler_config(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})  # fmt: skip


def as_times(sigmas: torch.Tensor) -> np.ndarray:
    """Our flow sigmas as ComfyUI's times ``t = sigma / (1 + sigma)`` (inf: 1)."""
    s = sigmas.numpy()
    with np.errstate(invalid="ignore"):
        return np.where(np.isinf(s), 1.0, s / (1 + s))


# -- the tables ------------------------------------------------------------------------------


def test_the_gits_tables_are_the_published_shape():
    """15 coefficients, 19 rows each (2 .. 20 steps), every row from SD 1.5's highest sigma
    to its lowest, strictly decreasing; a few values as the node file prints them."""
    assert sorted(GITS_LEVELS) == COEFFS
    for rows in GITS_LEVELS.values():
        assert [len(row) for row in rows] == list(range(3, 22))
        for row in rows:
            assert row[0] == 14.61464119 and row[-1] == 0.02916753
            assert all(a > b for a, b in itertools.pairwise(row))
    assert GITS_LEVELS[1.40][2] == (14.61464119, 1.08895338, 0.43325692, 0.13792117, 0.02916753)
    assert GITS_LEVELS[0.80][0] == (14.61464119, 7.49001646, 0.02916753)
    assert GITS_LEVELS[1.00][0] == (14.61464119, 1.56271636, 0.02916753)
    assert GITS_LEVELS[1.50][0] == (14.61464119, 0.54755926, 0.02916753)
    assert GITS_LEVELS[1.50][-1][:4] == (14.61464119, 2.45070267, 1.41535246, 0.95350921)


def test_the_optimal_steps_tables_are_the_published_ones():
    assert OPTIMAL_STEPS_LEVELS["flux"] == (0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471,
                                            0.9158, 0.8287, 0.5512, 0.2808, 0.001)  # fmt: skip
    assert len(OPTIMAL_STEPS_LEVELS["wan"]) == 21 and OPTIMAL_STEPS_LEVELS["wan"][0] == 1.0
    assert OPTIMAL_STEPS_LEVELS["wan"][-4:] == (0.776, 0.539, 0.208, 0.001)
    assert len(OPTIMAL_STEPS_LEVELS["chroma"]) == 41
    assert OPTIMAL_STEPS_LEVELS["chroma"][:3] == (0.992, 0.99, 0.988)
    assert OPTIMAL_STEPS_LEVELS["chroma"][-3:] == (0.058, 0.048, 0.001)
    for levels in OPTIMAL_STEPS_LEVELS.values():
        assert all(a > b for a, b in itertools.pairwise(levels))


# -- gits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("coeff", COEFFS)
@pytest.mark.parametrize("steps", GITS_STEPS)
def test_gits_equals_the_node(coeff, steps):
    ours = toolkit.schedule("gits", coeff=coeff)(steps, vp_levels())
    theirs = comfy_gits(coeff, steps)
    assert ours.shape == (steps + 1,) and ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), theirs.double().numpy(), rtol=TOL, atol=0)


def test_gits_default_coeff_is_the_nodes():
    ours = toolkit.schedule("gits")(10, vp_levels())
    np.testing.assert_allclose(ours.numpy(), comfy_gits(1.20, 10).double().numpy(), rtol=TOL)


@pytest.mark.parametrize("steps", [2, 10, 20])
def test_gits_within_the_table_is_the_row_exactly(steps):
    row = GITS_LEVELS[1.20][steps - 2]
    ours = toolkit.schedule("gits")(steps, vp_levels()).numpy()
    assert ours.tolist() == [*row[:-1], 0.0]


def test_gits_beyond_the_table_interpolates_the_20_step_row_in_log_sigma():
    """40 steps on an even grid keep the 20-step levels at even places; between two the level
    is their geometric mean."""
    row = np.asarray(GITS_LEVELS[1.20][-1])
    ours = toolkit.schedule("gits")(40, vp_levels()).numpy()
    np.testing.assert_allclose(ours[:-1:2], row[:-1], rtol=1e-12)
    np.testing.assert_allclose(ours[1:-1:2], np.sqrt(row[:-1] * row[1:]), rtol=1e-12)
    assert ours[-1] == 0


@pytest.mark.parametrize("coeff", [0.75, 1.55, 1.23, 0.0, -1.2])
def test_gits_refuses_a_coeff_without_a_table(coeff):
    with pytest.raises(toolkit.OptionError, match=r"coeff must be one of 0\.80, 0\.85"):
        toolkit.schedule("gits", coeff=coeff)


def test_gits_rounds_the_coeff_as_the_node():
    ours = toolkit.schedule("gits", coeff=1.1500000001)(8, vp_levels())
    np.testing.assert_allclose(ours.numpy(), comfy_gits(1.15, 8).double().numpy(), rtol=TOL)


def test_gits_refuses_one_step_and_flow_models():
    with pytest.raises(toolkit.DtkError, match="at least 2 steps"):
        toolkit.schedule("gits")(1, vp_levels())
    with pytest.raises(toolkit.DtkError, match="rectified-flow model"):
        toolkit.schedule("gits")(10, FlowLevels(shift=3.0))


# -- optimal_steps -------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(OPTIMAL_STEPS_LEVELS))
@pytest.mark.parametrize("steps", OPTIMAL_STEPS)
def test_optimal_steps_times_equal_the_node(model, steps):
    """The node's values are ComfyUI's "sigmas" of a flow model: times t. Ours are
    sigma = t / (1 - t) of the same times."""
    sigmas = toolkit.schedule("optimal_steps", model=model)(steps, FlowLevels(shift=3.0))
    theirs = comfy_optimal_steps(COMFY_MODEL[model], steps).double().numpy()
    assert sigmas.shape == (steps + 1,)
    np.testing.assert_allclose(as_times(sigmas), theirs, rtol=TOL, atol=0)


@pytest.mark.parametrize("model", list(OPTIMAL_STEPS_LEVELS))
def test_optimal_steps_at_the_table_length_is_the_table(model):
    published = np.asarray(OPTIMAL_STEPS_LEVELS[model])
    steps = len(published) - 1
    sigmas = toolkit.schedule("optimal_steps", model=model)(steps, FlowLevels()).numpy()
    with np.errstate(divide="ignore"):
        expected = np.where(published >= 1, math.inf, published / (1 - published))
    expected[-1] = 0.0
    np.testing.assert_allclose(sigmas, expected, rtol=1e-12, atol=0)


def test_optimal_steps_converts_times_to_flow_sigmas():
    """sigma = t / (1 - t), as ComfyUI's other flow schedules here; Wan's t = 1 is the
    engine's exact start at sigma = inf; Flux's 0.9968 is sigma = 311.5."""
    wan = toolkit.schedule("optimal_steps", model="wan")(20, FlowLevels())
    assert math.isinf(float(wan[0])) and math.isfinite(float(wan[1]))
    flux = toolkit.schedule("optimal_steps", model="flux")(10, FlowLevels())
    assert float(flux[0]) == pytest.approx(0.9968 / 0.0032, rel=1e-12)
    assert float(flux[-2]) == pytest.approx(0.2808 / 0.7192, rel=1e-12)
    assert float(flux[-1]) == 0.0


def test_optimal_steps_ignores_the_shift_as_the_node():
    one = toolkit.schedule("optimal_steps", model="chroma")(25, FlowLevels(shift=1.0))
    three = toolkit.schedule("optimal_steps", model="chroma")(25, FlowLevels(shift=3.0))
    dynamic = toolkit.schedule("optimal_steps", model="chroma")(25, FlowLevels(mu=1.15))
    torch.testing.assert_close(one, three, rtol=0, atol=0)
    torch.testing.assert_close(one, dynamic, rtol=0, atol=0)


@pytest.mark.parametrize("steps", [1, 2])
def test_optimal_steps_below_the_nodes_three_steps_still_interpolates(steps):
    sigmas = toolkit.schedule("optimal_steps")(steps, FlowLevels())
    theirs = comfy_optimal_steps("FLUX", steps).double().numpy()
    np.testing.assert_allclose(as_times(sigmas), theirs, rtol=TOL, atol=0)


def test_optimal_steps_refuses_an_unknown_model_and_vp_models():
    with pytest.raises(toolkit.OptionError, match="model"):
        toolkit.schedule("optimal_steps", model="sd3")
    from plugins.comfy_schedules import OptimalSteps

    with pytest.raises(toolkit.OptionError, match="model must be one of flux, wan, chroma"):
        OptimalSteps(model="FLUX")  # type: ignore[arg-type]
    with pytest.raises(toolkit.DtkError, match="rectified-flow models"):
        toolkit.schedule("optimal_steps")(10, vp_levels())


# -- both sample a model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from tiny_sd3 import save_sd3_pipeline

    return save_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "sd3")


def test_gits_samples_the_shipped_model_and_optimal_steps_a_flow_model(sd3, tmp_path):
    for name, model, extra in (("gits", None, {"conditions": {"digit": "3"}}),
                               ("optimal_steps", sd3, {"prompt": "a photo of a cat"})):  # fmt: skip
        written = toolkit.generate(model, out=tmp_path / name, n=1, steps=4, schedule=name,
                                   sampler="euler", progress=False, **extra)  # fmt: skip
        assert len(written) == 1 and set(written["schedule"]) == {name}
