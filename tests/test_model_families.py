"""Folders of diffusers families dtk does not load yet are refused in one line that names
the family, read from the configs, before any weights load (and nothing is written)."""

from __future__ import annotations

import time

import pytest
from invoke import dtk
from tiny_families import UNSUPPORTED, build

from toolkit import DtkError
from toolkit.models.detect import TEXT, UNET, detect_family


@pytest.mark.parametrize("builder", list(UNSUPPORTED), ids=lambda b: b.__name__)
def test_an_unsupported_family_is_named_in_one_line(builder, tmp_path):
    folder = build(builder, tmp_path / builder.__name__)
    started = time.monotonic()
    result = dtk("generate", "--model", folder, "-n", 1, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert UNSUPPORTED[builder] in line and "does not support yet" in line, line
    assert str(folder) in line
    assert not (tmp_path / "out").exists()
    assert time.monotonic() - started < 5  # from the configs: no weights were loaded


def test_detection_reads_the_supported_families(tmp_path):
    from tiny_models import save_bare_unet, save_pipeline
    from tiny_sd import save_sd_pipeline

    assert detect_family(save_pipeline(tmp_path / "ddpm")) == UNET
    assert detect_family(save_bare_unet(tmp_path / "bare")) == UNET
    assert detect_family(save_sd_pipeline(tmp_path / "sd")) == TEXT
    with pytest.raises(DtkError, match="does not exist"):
        detect_family(tmp_path / "missing")
    with pytest.raises(DtkError, match="not a diffusers model folder"):
        detect_family(tmp_path)


def test_weights_that_do_not_fit_the_config_are_one_line(tmp_path):
    import json

    from tiny_models import save_pipeline

    folder = save_pipeline(tmp_path / "m")
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["block_out_channels"] = [16, 48]
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    result = dtk("generate", "--model", folder, "-n", 1, "--out", tmp_path / "out")
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert "the UNet's weights do not fit its config.json" in line
    assert "tensor(s) differ in shape (first: " in line
    assert not (tmp_path / "out").exists()
