"""Every built-in sampler on a VE score-SDE model (docs/samplers.md, the samplers table's VE
column): sigma space is a VE model's own (``x = x0 + sigma eps``, `toolkit.models.ve`), so
each sampler runs on it as it is; ``lcm`` (discrete-time VP only) and ``diffusers`` (which
does not run ``ScoreSdeVeScheduler``) are refused. tests/test_ve.py checks ``euler`` and
``score_sde_ve`` against the pipeline's math."""

from __future__ import annotations

import pytest
import torch
from sampling_helpers import sample_requests
from tiny_models import save_ve_pipeline

import toolkit
from toolkit.models import load_model
from toolkit.sampling.engine import sample_images

#: built-in samplers documented as not applicable to a VE model, and why
NOT_FOR_VE = {"lcm": "needs a discrete-time VP model", "tcd": "needs a discrete-time VP model",
              "diffusers": "variance-exploding"}  # fmt: skip


def builtin_samplers() -> list[str]:
    from plugins.samplers import SAMPLERS

    return [cls.name for cls in SAMPLERS]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ve") / "cond"
    return load_model(save_ve_pipeline(folder, conditional=True, sigma_min=0.02, sigma_max=80.0))


def images(model, name: str, schedule: str) -> torch.Tensor:
    requests = sample_requests([3, 4], [{"digit": "1"}, {"digit": "2", "group": "dark"}])
    sigmas = toolkit.schedule(schedule)(5, model.noise_levels)
    return sample_images(model, toolkit.sampler(name), toolkit.guidance("cfg", scale=2.0),
                         sigmas, requests)  # fmt: skip


@pytest.mark.parametrize("name", [n for n in builtin_samplers() if n not in NOT_FOR_VE])
def test_every_builtin_sampler_samples_a_ve_model(model, name):
    for schedule in ("karras", "exponential"):
        out = images(model, name, schedule)
        assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(NOT_FOR_VE))
def test_what_does_not_apply_to_a_ve_model_is_refused(model, name):
    with pytest.raises(toolkit.DtkError, match=NOT_FOR_VE[name]):
        images(model, name, "karras")
