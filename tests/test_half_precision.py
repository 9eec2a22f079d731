"""Every family loads in the precision asked for: the denoising network (and the text
encoders) in bfloat16 or float16, whatever path diffusers' loader takes (0.42 keeps SD 3's
transformer in float32 when it assigns the checkpoint's state dict:
`toolkit.models.stable_diffusion.load_part` casts it). T5 keeps its ``wo`` layers in float32
in float16, as transformers means it to."""

from __future__ import annotations

import pytest
import torch
from tiny_dit import save_dit_pipeline
from tiny_flux import save_flux_pipeline
from tiny_lcm import save_lcm_pipeline
from tiny_pixart import save_pixart_pipeline
from tiny_sd import save_sd_pipeline
from tiny_sd3 import save_sd3_pipeline
from tiny_sdxl import save_sdxl_pipeline

from toolkit.models import load_model

SAVE = {
    "stable-diffusion": save_sd_pipeline,
    "sdxl": save_sdxl_pipeline,
    "lcm": save_lcm_pipeline,
    "sd3": lambda path: save_sd3_pipeline(path, t5=True),
    "flux": save_flux_pipeline,
    "pixart": save_pixart_pipeline,
    "dit": save_dit_pipeline,
}


def dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters() if p.is_floating_point()}


@pytest.mark.parametrize("family", list(SAVE))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_network_and_text_encoders_load_in_the_dtype_asked_for(tmp_path, family, dtype):
    model = load_model(SAVE[family](tmp_path / family), dtype=dtype)
    assert model.dtype == dtype and dtypes(model.network) == {dtype}
    for encoder in getattr(getattr(model, "prompts", None), "encoders", []):
        kept = set(getattr(encoder, "_keep_in_fp32_modules", None) or ())
        assert dtypes(encoder) == ({dtype, torch.float32} if kept and dtype == torch.float16
                                   else {dtype})  # fmt: skip
