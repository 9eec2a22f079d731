"""The shipped generator: loads without arguments and draws what is asked of it."""

from __future__ import annotations

import json

import pandas
from click.testing import CliRunner
from PIL import Image
from sampling_helpers import sample_requests

import toolkit
from toolkit.cli import cli
from toolkit.generation.generate import default_model
from toolkit.models import load_model
from toolkit.sampling.engine import sample_images


def test_the_default_model_is_shipped_with_its_provenance():
    path = default_model()
    assert path is not None
    model = load_model(path)
    assert model.labels.names == ["digit", "group"]
    assert model.labels.attribute("digit").values == tuple(str(d) for d in range(10))
    assert set(model.labels.attribute("group").values) == {"light", "dark"}
    assert model.labels.null_label is not None
    readme = (path / "README.md").read_text()
    assert "dtk train" in readme and "--seed" in readme
    training = json.loads((path / "training.json").read_text())
    assert training["config"]["attributes"] == ["digit", "group"]


def test_generate_without_model_uses_the_shipped_one(tmp_path):
    grid = tmp_path / "grid.png"
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["generate", "--condition", "digit=7", "-n", "4",
                                      "--grid", str(grid), "--out", str(out), "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    metadata = pandas.read_csv(out / "metadata.csv")
    assert len(metadata) == 4 and set(metadata["digit"]) == {7}
    assert Image.open(grid).size[0] >= 2 * 16


def test_the_shipped_generator_draws_the_requested_digit_and_group():
    model = load_model(default_model())
    requests = [{"digit": str(d), "group": g} for d in range(10) for g in ("light", "dark")]
    sigmas = toolkit.schedule("karras")(20, model.noise_levels)
    images = sample_images(model, toolkit.sampler("dpmpp_2m"), toolkit.guidance("cfg", scale=2.0),
                           sigmas, sample_requests(range(len(requests)), requests))  # fmt: skip
    for attribute in ("digit", "group"):
        classifier = toolkit.attribute_classifier("cnn", attribute=attribute)
        predicted = classifier.predict_proba(images).argmax(1).tolist()
        wanted = [classifier.labels.index(r[attribute]) for r in requests]
        accuracy = sum(p == w for p, w in zip(predicted, wanted)) / len(requests)
        assert accuracy >= 0.95, (attribute, accuracy)
