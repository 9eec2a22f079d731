"""A family's default sampling is the twin of its folder's scheduler: the sampler and
schedule (with options) whose sigmas are the scheduler's own."""

from __future__ import annotations

import diffusers
import pytest
import torch

import toolkit
from toolkit.models.twins import scheduler_twin

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@pytest.mark.parametrize(
    ("cls", "config", "twin"),
    [
        ("EulerDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1},
         ("euler", "leading", {"offset": 1})),
        ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, ("euler", "trailing", {})),
        ("EulerDiscreteScheduler", {"timestep_spacing": "linspace"}, ("euler", "linspace", {})),
        ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, ("euler", "karras", {})),
        ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"},
         ("euler_ancestral", "trailing", {})),
        ("DPMSolverMultistepScheduler", {}, ("dpmpp_2m", "linspace", {"variant": "dpmsolver"})),
        ("UniPCMultistepScheduler", {}, ("unipc", "linspace", {"variant": "dpmsolver"})),
    ],
)  # fmt: skip
def test_the_twins_schedule_is_the_schedulers_sigmas(cls, config, twin):
    scheduler = getattr(diffusers, cls)(**SD, **config)
    assert scheduler_twin({"_class_name": cls, **scheduler.config}) == twin
    scheduler.set_timesteps(12)
    levels = toolkit.NoiseLevels.from_scheduler_config(scheduler.config)
    ours = toolkit.schedule(twin[1], **twin[2])(12, levels)
    torch.testing.assert_close(ours.float(), scheduler.sigmas.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("cls", "config"),
    [
        ("DPMSolverMultistepScheduler", {"timestep_spacing": "leading"}),  # its own leading
        ("DPMSolverMultistepScheduler", {"solver_order": 3}),
        ("EulerDiscreteScheduler", {"interpolation_type": "log_linear"}),
        ("HeunDiscreteScheduler", {}),
    ],
)
def test_no_twin_where_none_computes_the_same(cls, config):
    assert scheduler_twin({"_class_name": cls, **config}) is None
