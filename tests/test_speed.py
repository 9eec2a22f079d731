"""Speed levers (issue 16): ``--compile`` and ``--channels-last`` give the eager images
(within one pixel level), are recorded in run.json outside the run's identity, and are
refused in one line when misused. Compiling a tiny UNet with inductor takes tens of seconds
on a CPU: one run covers compile, its cache and a second batch shape."""

from __future__ import annotations

import json

import pytest
import torch
from folders import max_pixel_difference, pixels
from invoke import dtk
from tiny_models import save_pipeline

import toolkit
from toolkit.models.speed import CACHE_VARIABLE, accelerate

RUN = dict(conditions={"digit": "1"}, n=3, batch_size=2, steps=4, progress=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_pipeline(tmp_path_factory.mktemp("speed") / "cond", conditional=True)


@pytest.fixture(scope="module")
def eager(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("eager") / "out"
    toolkit.generate(folder, out=out, **RUN)
    return pixels(out)


def test_compiled_runs_give_the_eager_images_and_fill_the_cache(folder, eager, tmp_path,
                                                                monkeypatch):  # fmt: skip
    """Batches of 2 then 1 (a second shape: one recompile, with a symbolic batch size) through
    the compiled network: the eager images within one level, kernels in the given cache."""
    monkeypatch.setenv(CACHE_VARIABLE, str(tmp_path / "unused"))  # restored afterwards
    cache, out = tmp_path / "cache", tmp_path / "out"
    toolkit.generate(folder, out=out, compile="default", compile_cache=str(cache), **RUN)
    assert max_pixel_difference(pixels(out), eager) <= 1
    assert any(cache.rglob("*"))
    record = json.loads((out / "run.json").read_text())
    assert record["speed"] == {"compile": "default", "channels_last": False}


def test_channels_last_gives_the_eager_images(folder, eager, tmp_path):
    out = tmp_path / "out"
    toolkit.generate(folder, out=out, channels_last=True, **RUN)
    assert max_pixel_difference(pixels(out), eager) <= 1
    assert json.loads((out / "run.json").read_text())["speed"]["channels_last"] is True


def test_a_run_resumes_with_other_speed_settings(folder, tmp_path):
    """Speed settings change how fast, not what: a resumed run may change them."""
    out = tmp_path / "out"
    toolkit.generate(folder, out=out, **{**RUN, "n": 2})
    toolkit.generate(folder, out=out, channels_last=True, **RUN)
    assert len(pixels(out)) == 3


def test_channels_last_reformats_the_convolutions():
    from tiny_models import tiny_unet

    model = type("M", (), {"network": tiny_unet()})()
    accelerate(model, compile=None, channels_last=True)
    weights = [p for p in model.network.parameters() if p.ndim == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--compile", "fast"], "'fast' is not one of 'default', 'max-autotune'"),
        (["--compile-cache", "cache"], "a compile cache needs --compile"),
    ],
)
def test_misuse_is_one_line(folder, tmp_path, args, message):
    result = dtk("generate", "--model", folder, "--condition", "digit=1", "-n", "1",
                 "--out", tmp_path / "out", *args)  # fmt: skip
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
