"""What generation guarantees whatever a plugin does: filters judge copies, so the saved
pixels are the sampler's; a sample whose result is not finite is never saved as an image."""

from __future__ import annotations

import numpy as np
import pandas
import pytest
from folders import pixels
from invoke import dtk
from tiny_models import save_pipeline

from toolkit import GenerationWarning
from toolkit.generation.generate import generate

VANDAL_FILTER = """
    import toolkit
    from toolkit.sampling.safety import Verdict

    class Vandal:
        name = "vandal"

        def __call__(self, images, requests):
            images.zero_()  # a buggy filter that changes what it was handed
            return [Verdict(False, "", 0.0) for _ in requests]

    @toolkit.hookimpl
    def register_safety_filters(register):
        register(Vandal)
"""

# Sample k of a batch becomes `value` when k is in `bad` (positions within the batch).
POISON_SAMPLER = """
    import toolkit

    class Poison:
        name = "poison"

        def __init__(self, value: float = float("nan"), bad: str = "1") -> None:
            self.value, self.bad = value, [int(k) for k in bad.split(",")]

        def __call__(self, denoise, x, sigmas, *, noise, callback=None):
            x0 = denoise(x, float(sigmas[0])).clone()
            for k in self.bad:
                if k < len(x0):
                    x0[k, 0, 0, 0] = self.value
            return x0

    @toolkit.hookimpl
    def register_samplers(register):
        register(Poison)
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_pipeline(tmp_path_factory.mktemp("models") / "uncond")


def test_a_filter_cannot_change_the_saved_pixels(model, tmp_path, make_dist):
    make_dist("fake-vandal", fake_vandal=VANDAL_FILTER)
    plain, filtered = tmp_path / "plain", tmp_path / "filtered"
    generate(model, out=plain, n=2, steps=2, progress=False)
    metadata = generate(model, out=filtered, n=2, steps=2, filters=["vandal"], progress=False)
    assert list(metadata["status"]) == ["ok", "ok"]
    ours, reference = pixels(filtered), pixels(plain)
    assert all(np.array_equal(ours[i], reference[i]) for i in (0, 1))
    assert all(reference[i].max() > 0 for i in (0, 1))  # not black to begin with


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_samples_are_caught_without_any_filter(model, tmp_path, make_dist, value):
    make_dist("fake-poison", fake_poison=POISON_SAMPLER)
    out = tmp_path / "out"
    with pytest.warns(GenerationWarning, match=r"1 of 3 samples had non-finite values"):
        metadata = generate(model, out=out, n=3, batch_size=2, sampler="poison",
                            sampler_options={"value": float(value)}, progress=False)  # fmt: skip
    assert list(metadata["index"]) == [0, 2]
    assert set(metadata["status"]) == {"ok"}
    rejected = pandas.read_csv(out / "rejected.csv")
    assert list(rejected["index"]) == [1]
    assert list(rejected["status"]) == ["failed"]
    assert "non-finite" in rejected["reason"][0]
    assert len(list(out.glob("*/*.png"))) == 2


def test_the_cli_says_how_many_samples_failed(model, tmp_path, make_dist):
    make_dist("fake-poison", fake_poison=POISON_SAMPLER)
    result = dtk("generate", "--model", model, "-n", 2, "--sampler", "poison",
                 "--sampler-option", "bad=0,1", "--out", tmp_path / "out", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "dtk: warning: 2 of 2 samples had non-finite values" in result.stderr
    assert "0 images in" in result.stderr
