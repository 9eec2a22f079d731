"""`toolkit.reuse_models`: inside the block a run takes the previous run's loaded model when
nothing that shapes it differs, outside nothing is kept; the images are those of a fresh
load."""

from __future__ import annotations

import os

import pytest
from folders import max_pixel_difference, pixels
from tiny_models import save_pipeline

import toolkit
from toolkit.generation import reuse
from toolkit.models.label_unet import LabelUNetFolder

KW = dict(conditions={"digit": "1"}, n=2, steps=3, sampler="euler", progress=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_pipeline(tmp_path_factory.mktemp("models") / "cond", conditional=True)


@pytest.fixture
def loads(monkeypatch):
    """The number of times a label model's weights were loaded."""
    count = [0]
    load = LabelUNetFolder.load

    def counted(self, **kwargs):
        count[0] += 1
        return load(self, **kwargs)

    monkeypatch.setattr(LabelUNetFolder, "load", counted)
    return count


def test_a_run_inside_the_block_takes_the_loaded_model(model, tmp_path, loads):
    with toolkit.reuse_models():
        toolkit.generate(model, out=tmp_path / "a", **KW)
        toolkit.generate(model, out=tmp_path / "b", seed=5, **KW)
        assert loads[0] == 1
        # another precision is another model
        toolkit.generate(model, out=tmp_path / "c", dtype="bfloat16", **KW)
        assert loads[0] == 2
        # a changed weight file too
        weights = next((model / "unet").glob("*.safetensors"))
        stat = weights.stat()
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        toolkit.generate(model, out=tmp_path / "d", **KW)
        assert loads[0] == 3
    assert reuse._kept is None  # nothing kept after the block
    toolkit.generate(model, out=tmp_path / "e", **KW)
    toolkit.generate(model, out=tmp_path / "f", **KW)
    assert loads[0] == 5  # outside the block, every run loads
    assert max_pixel_difference(pixels(tmp_path / "a"), pixels(tmp_path / "e")) == 0
    assert max_pixel_difference(pixels(tmp_path / "d"), pixels(tmp_path / "f")) == 0


def test_a_kept_model_is_as_good_as_a_fresh_one_after_guidance_hooks(model, tmp_path, loads):
    """A run with perturbed guidance and a step cache leaves the kept network as it was."""
    hooked = dict(KW, guidance="pag", step_cache="deepcache")
    with toolkit.reuse_models():
        toolkit.generate(model, out=tmp_path / "hooked", **hooked)
        toolkit.generate(model, out=tmp_path / "after", **KW)
    toolkit.generate(model, out=tmp_path / "fresh", **KW)
    assert loads[0] == 2
    assert max_pixel_difference(pixels(tmp_path / "after"), pixels(tmp_path / "fresh")) == 0


def test_keep_holds_the_last_models_used(model, tmp_path, loads):
    """keep=2: alternating between two settings loads each once; a third evicts the one
    used least recently."""
    with toolkit.reuse_models(keep=2):
        for k, dtype in enumerate(["float32", "bfloat16", "float32", "bfloat16"]):
            toolkit.generate(model, out=tmp_path / f"a{k}", dtype=dtype, **KW)
        assert loads[0] == 2
        toolkit.generate(model, out=tmp_path / "c", dtype="float16", **KW)  # evicts float32
        toolkit.generate(model, out=tmp_path / "d", dtype="bfloat16", **KW)
        assert loads[0] == 3
        toolkit.generate(model, out=tmp_path / "e", dtype="float32", **KW)
        assert loads[0] == 4
    with pytest.raises(ValueError, match="at least one"), toolkit.reuse_models(keep=0):
        pass
