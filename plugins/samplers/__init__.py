"""The built-in samplers. Each computes the update rule of its namesake in k-diffusion
(``ddim``, ``ddpm``, ``unipc`` and ``lcm``: in diffusers; ``heunpp2``, ``ipndm``,
``ipndm_v``, ``res_multistep``, ``gradient_estimation``, the CFG++ samplers
(``*_cfg_pp``), SEEDS (``seeds_2``, ``seeds_3``, ``exp_heun_2_x0``) and ``er_sde``: in
ComfyUI; ``dpm_fast`` and ``dpm_adaptive``: k-diffusion's ``DPMSolver`` as ComfyUI calls
it; ``deis`` (diffusers' ``DEISMultistepScheduler``, or ComfyUI's with ``mode=tab``),
``sa_solver`` and ``sa_solver_pece`` (ComfyUI), ``tcd`` (diffusers' ``TCDScheduler``) and
``restart`` (AUTOMATIC1111's, by the paper's authors)); shared math is in `updates`."""

from __future__ import annotations

import toolkit
from plugins.samplers.cfg_pp import (
    DPMPP2MCFGPP,
    DPMPP2SAncestralCFGPP,
    EulerAncestralCFGPP,
    EulerCFGPP,
)
from plugins.samplers.ddim import DDIM, DDPM
from plugins.samplers.deis import DEIS
from plugins.samplers.diffusers_adapter import DiffusersScheduler
from plugins.samplers.dpm_solver import DPMAdaptive, DPMFast
from plugins.samplers.dpmpp import (
    DPMPP2M,
    DPMPP2MSDE,
    DPMPP3MSDE,
    DPMPPSDE,
    DPMPP2MSDEHeun,
    DPMPP2SAncestral,
)
from plugins.samplers.er_sde import ERSDE
from plugins.samplers.euler import DPM2, DPM2Ancestral, Euler, EulerAncestral, Heun, HeunPP2
from plugins.samplers.ipndm import IPNDM, IPNDMV
from plugins.samplers.lcm import LCM
from plugins.samplers.lms import LMS
from plugins.samplers.res import (
    GradientEstimation,
    GradientEstimationCFGPP,
    ResMultistep,
    ResMultistepAncestral,
    ResMultistepAncestralCFGPP,
    ResMultistepCFGPP,
)
from plugins.samplers.restart import Restart
from plugins.samplers.sa_solver import SASolver, SASolverPECE
from plugins.samplers.score_sde import ScoreSdeVe
from plugins.samplers.seeds import ExpHeun2X0, ExpHeun2X0SDE, Seeds2, Seeds3
from plugins.samplers.tcd import TCD
from plugins.samplers.unipc import UniPC

SAMPLERS = (
    DDIM,
    DDPM,
    Euler,
    EulerAncestral,
    Heun,
    HeunPP2,
    DPM2,
    DPM2Ancestral,
    LMS,
    DPMPP2SAncestral,
    DPMPPSDE,
    DPMPP2M,
    DPMPP2MSDE,
    DPMPP2MSDEHeun,
    DPMPP3MSDE,
    UniPC,
    IPNDM,
    IPNDMV,
    ResMultistep,
    ResMultistepAncestral,
    GradientEstimation,
    EulerCFGPP,
    EulerAncestralCFGPP,
    DPMPP2SAncestralCFGPP,
    DPMPP2MCFGPP,
    ResMultistepCFGPP,
    ResMultistepAncestralCFGPP,
    GradientEstimationCFGPP,
    DPMFast,
    DPMAdaptive,
    ExpHeun2X0,
    ExpHeun2X0SDE,
    ERSDE,
    Seeds2,
    Seeds3,
    DEIS,
    SASolver,
    SASolverPECE,
    Restart,
    ScoreSdeVe,
    LCM,
    TCD,
    DiffusersScheduler,
)


@toolkit.hookimpl
def register_samplers(register: toolkit.Register) -> None:
    for sampler in SAMPLERS:
        register(sampler)
