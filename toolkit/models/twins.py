"""Our sampler and schedule that compute what a folder's own diffusers scheduler computes:
a family's default sampling is the twin of its pipeline's scheduler, so the bare command
gives the pipeline's images (tests/test_samplers_diffusers.py checks each pair)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: a scheduler class -> our sampler that steps as it does (with its default options)
SAMPLERS = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "UniPCMultistepScheduler": "unipc",
}
#: a scheduler's sigma flag -> our schedule of the same sigmas
SIGMA_FLAGS = (("use_karras_sigmas", "karras"), ("use_exponential_sigmas", "exponential"),
               ("use_beta_sigmas", "beta"))  # fmt: skip
#: schedulers whose "linspace" timesteps are DPM-Solver's rounded ones, not Euler's
DPMSOLVER_SPACING = {"DPMSolverMultistepScheduler", "UniPCMultistepScheduler"}


def scheduler_twin(config: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]] | None:
    """(sampler, schedule, schedule options) computing what the scheduler `config`
    describes, or None where we have no exact twin (another scheduler or setting)."""
    cls = str(config.get("_class_name", ""))
    sampler = SAMPLERS.get(cls)
    if sampler is None or not _default_solver(cls, config):
        return None
    for flag, schedule in SIGMA_FLAGS:
        if config.get(flag):
            return sampler, schedule, {}
    if config.get("interpolation_type", "linear") != "linear":
        return None
    spacing = config.get("timestep_spacing", "leading" if cls.startswith("DD") else "linspace")
    if cls in DPMSOLVER_SPACING:  # their leading/trailing differ from Euler's: no twin
        return (sampler, "linspace", {"variant": "dpmsolver"}) if spacing == "linspace" else None
    if spacing == "leading":
        offset = int(config.get("steps_offset") or 0)
        return sampler, "leading", ({"offset": offset} if offset else {})
    if spacing in ("trailing", "linspace"):
        return sampler, spacing, {}
    return None


def _default_solver(cls: str, config: Mapping[str, Any]) -> bool:
    """Whether the scheduler runs the update our sampler of its name computes."""
    if cls == "DPMSolverMultistepScheduler":
        return (config.get("algorithm_type", "dpmsolver++") == "dpmsolver++"
                and config.get("solver_order", 2) == 2
                and config.get("final_sigmas_type", "zero") == "zero")  # fmt: skip
    if cls == "UniPCMultistepScheduler":
        return config.get("final_sigmas_type", "zero") == "zero"
    return True
