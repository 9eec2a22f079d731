"""Every default a user sees, in one place: the CLI's option defaults, `toolkit.generate`'s
keyword defaults and the docs all read them from here."""

from __future__ import annotations

#: the sampler, schedule and steps of a run that names none, unless the model's family has
#: its own (`ModelFolder.default_sampling`; SD 3: its pipeline's): "DPM++ 2M Karras"
SAMPLER = "dpmpp_2m"
SCHEDULE = "karras"
STEPS = 20
#: ... and of a label-conditioned UNet's (the shipped model's): DEIS on Karras sigmas, the
#: best deterministic sampler + schedule on the shipped model across 5 to 50 network
#: evaluations (benchmarks/quality_vs_nfe.py; docs/samplers.md, "Quality against network
#: evaluations")
LABEL_SAMPLER = "deis"
#: samples per batch (per batched forward pass) when none is given: the largest power of
#: two whose samples hold at most `BATCH_ELEMENTS` values, at most `MAX_BATCH` (the shipped
#: model, 3x32x32: 64, measured 1.10x faster than 16 on a CPU; SD 1.5's 4x64x64 latents:
#: 16; SDXL's 4x128x128: 4; SD 3's and Flux's 16x128x128: 1). Activations grow with a
#: sample's size, so a batch of large samples is kept small; `--batch-size` overrides it
BATCH_SIZE = None
BATCH_ELEMENTS = 2**18
MAX_BATCH = 64


def batch_size(sample_shape: tuple[int, ...]) -> int:
    """The default batch size for samples of `sample_shape` (see `BATCH_SIZE`)."""
    elements = 1
    for side in sample_shape:
        elements *= side
    size = 1
    while size * 2 <= MAX_BATCH and size * 2 * elements <= BATCH_ELEMENTS:
        size *= 2
    return size


#: samples of `dtk generate` when -n is not given
SAMPLES = 16
DEVICE = "auto"
DTYPE = "float32"
DTYPES = ("float32", "float16", "bfloat16")
#: torch.compile's modes a run may ask for (`--compile`): inductor's default, and its
#: slower-to-compile autotuned one
COMPILE_MODES = ("default", "max-autotune")
#: what happens to an image a safety filter flags
ON_FLAG = "drop"
#: classifier-free guidance scale of a conditioned request on a label model that names no
#: guidance (the shipped model's measured sweet spot: docs/embedded-default.md)
LABEL_CFG_SCALE = 2.0
#: ... and of a prompted request on a text-to-image model, as diffusers' pipelines
TEXT_CFG_SCALE = 7.5
#: the output folder of `dtk generate` when --out is not given
OUT = "dtk-out"
