"""The `sd_safety_checker` filter against diffusers' own StableDiffusionSafetyChecker."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pandas
import pytest
import torch
from click.testing import CliRunner
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from folders import pixels
from tiny_sd import save_safety_checker, save_sd_pipeline
from transformers import CLIPImageProcessor, CLIPVisionModel

import toolkit
from toolkit.cli import cli
from toolkit.errors import DtkError

NAME = "sd_safety_checker"
NEVER = 1.5  # a threshold no cosine similarity reaches
CAT = "a photo of a cat"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd-safety")
    bare = save_sd_pipeline(root / "bare")
    sd = root / "sd"
    shutil.copytree(bare, sd)
    save_safety_checker(sd)
    return {"sd": sd, "bare": bare}


@pytest.fixture(scope="module")
def images():
    # noise around a per-image colour, so the embeddings (and decisions) differ
    g = torch.Generator().manual_seed(0)
    return torch.rand(8, 3, 16, 16, generator=g) * 0.5 + torch.rand(8, 3, 1, 1, generator=g) * 0.5


def set_thresholds(folder, concept, special) -> None:
    checker = StableDiffusionSafetyChecker.from_pretrained(folder / "safety_checker")
    with torch.no_grad():
        checker.concept_embeds_weights.copy_(torch.as_tensor(concept, dtype=torch.float32))
        checker.special_care_embeds_weights.copy_(torch.as_tensor(special, dtype=torch.float32))
    checker.save_pretrained(folder / "safety_checker")


def similarities(folder, images):
    return toolkit.safety_filter(NAME, model=folder).similarities(images)


def diffusers_decisions(folder, images: torch.Tensor) -> list[bool]:
    """`has_nsfw_concepts` as StableDiffusionPipeline gets it for numpy output images."""
    checker = StableDiffusionSafetyChecker.from_pretrained(folder / "safety_checker")
    extractor = CLIPImageProcessor.from_pretrained(folder / "feature_extractor")
    array = images.permute(0, 2, 3, 1).numpy()
    clip_input = extractor(VaeImageProcessor.numpy_to_pil(array), return_tensors="pt")
    blacked, has_nsfw = checker(images=array.copy(), clip_input=clip_input.pixel_values)
    assert all(not blacked[i].any() for i, bad in enumerate(has_nsfw) if bad)  # it would black out
    return list(has_nsfw)


def median_split(concept_cos) -> float:
    """A threshold halfway between the middle images' best concept similarities."""
    best = np.sort(concept_cos.max(axis=1))
    middle = len(best) // 2
    assert best[middle] - best[middle - 1] > 0.002, best  # clear of the checker's rounding
    return float(best[middle - 1] + best[middle]) / 2


def thresholds(case: str, concept_cos, special_cos):
    if case == "median":
        return [median_split(concept_cos)] * 17, [NEVER] * 3
    # image 0 sits 0.005 under every concept threshold: only the special-care margin (0.01)
    # tips it over, and only when a special-care concept fires for it
    concept = concept_cos[0] + 0.005
    special = special_cos[0] - 0.05 if case == "special care fires" else [NEVER] * 3
    return concept, special


def test_registered_and_cheap_to_list():
    rows = toolkit.plugins("safety_filter").set_index("name")
    assert rows.loc[NAME, "kind"] == "safety_filter"
    assert rows.loc[NAME, "status"] == "ok"
    code = "import sys, plugins.sd_safety; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("case", ["median", "special care idle", "special care fires"])
def test_decisions_equal_diffusers_checker(folders, images, case):
    concept, special = thresholds(case, *similarities(folders["sd"], images))
    set_thresholds(folders["sd"], concept, special)
    verdicts = toolkit.safety_filter(NAME, model=folders["sd"])(images, [None] * len(images))
    flagged = [v.flagged for v in verdicts]
    assert flagged == diffusers_decisions(folders["sd"], images)
    if case == "median":
        assert sum(flagged) == len(images) // 2
    else:
        assert flagged[0] == (case == "special care fires")
    for v in verdicts:
        assert isinstance(v.score, float) and (v.score > 0) == v.flagged
        assert (" of 17 NSFW concepts fired" in v.reason) if v.flagged else v.reason == ""
    if case == "special care fires":
        assert "special-care" in verdicts[0].reason


def test_threshold_adjustment_is_added_to_thresholds(folders, images):
    split = median_split(similarities(folders["sd"], images)[0])
    set_thresholds(folders["sd"], [split] * 17, [NEVER] * 3)
    runs = {}
    for adjustment in (-2.0, -0.03, 0.0, 0.03, 2.0):
        flt = toolkit.safety_filter(NAME, model=folders["sd"], threshold_adjustment=adjustment)
        runs[adjustment] = flt(images, [None] * len(images))
    flagged = {a: np.array([v.flagged for v in vs]) for a, vs in runs.items()}
    assert flagged[-2.0].all() and not flagged[2.0].any()
    # negative is stricter: each step down flags a superset, and here strictly more
    steps = sorted(flagged)
    for looser, stricter in zip(steps[1:], steps[:-1]):
        assert (flagged[stricter] >= flagged[looser]).all()
        assert flagged[stricter].sum() > flagged[looser].sum()
    # the score moves by minus the adjustment (up to the checker's 3-decimal rounding)
    for adjustment in (-0.03, 0.03):
        for base, moved in zip(runs[0.0], runs[adjustment]):
            assert moved.score == pytest.approx(base.score - adjustment, abs=0.0015)
    # and equals diffusers' checker with every threshold moved by the same amount
    set_thresholds(folders["sd"], [split + 0.03] * 17, [NEVER + 0.03] * 3)
    assert list(flagged[0.03]) == diffusers_decisions(folders["sd"], images)


def generate(args, out):
    command = ["generate", "--prompt", CAT, "-n", "6", "--steps", "2", "--out", str(out), "-q"]
    return CliRunner().invoke(cli, [*command, *args])


def test_cli_records_verdicts_and_on_flag_decides(folders, tmp_path):
    sd = str(folders["sd"])
    plain = tmp_path / "plain"
    assert generate(["--model", sd], plain).exit_code == 0
    baseline = pixels(plain)
    images = torch.tensor(np.stack([baseline[i] for i in range(6)])).permute(0, 3, 1, 2) / 255
    set_thresholds(folders["sd"], [median_split(similarities(sd, images)[0])] * 17, [NEVER] * 3)
    expected = diffusers_decisions(folders["sd"], images)
    assert 0 < sum(expected) < 6

    filtered = ["--model", sd, "--filter", NAME, "--filter-option", f"model={sd}"]
    tagged = tmp_path / "tagged"
    result = generate([*filtered, "--on-flag", "tag"], tagged)
    assert result.exit_code == 0, result.output
    metadata = pandas.read_csv(tagged / "metadata.csv", keep_default_na=False)
    assert list(metadata[f"filter_{NAME}_flagged"]) == expected
    assert ((metadata[f"filter_{NAME}_score"] > 0) == metadata[f"filter_{NAME}_flagged"]).all()
    reasons = metadata[f"filter_{NAME}_reason"]
    assert (reasons.str.contains("NSFW concepts fired") == metadata[f"filter_{NAME}_flagged"]).all()
    assert list(metadata["status"]) == ["tagged" if e else "ok" for e in expected]
    # tagged images are written as generated: the filter never blacks them out
    for i, image in pixels(tagged, metadata).items():
        assert np.array_equal(image, baseline[i]), i

    dropped = tmp_path / "dropped"
    result = generate([*filtered, "--on-flag", "drop"], dropped)
    assert result.exit_code == 0, result.output
    kept = pandas.read_csv(dropped / "metadata.csv")
    rejected = pandas.read_csv(dropped / "rejected.csv")
    assert list(kept["index"]) == [i for i in range(6) if not expected[i]]
    assert list(rejected["index"]) == [i for i in range(6) if expected[i]]
    assert set(rejected["status"]) == {"dropped"}


def test_failure_inside_the_checker_aborts_the_run(folders, tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("vision tower on fire")

    monkeypatch.setattr(CLIPVisionModel, "forward", broken)
    sd, out = str(folders["sd"]), tmp_path / "out"
    result = generate(["--model", sd, "--filter", NAME, "--filter-option", f"model={sd}"], out)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "fail closed" in lines[0] and NAME in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not (out / "metadata.csv").exists()
    assert not list(out.rglob("*.png"))


def test_missing_or_pickled_checker_is_one_clear_line(folders, tmp_path):
    bare, out = str(folders["bare"]), tmp_path / "out"
    result = generate(["--model", bare, "--filter", NAME, "--filter-option", f"model={bare}"], out)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no safety_checker/ folder" in result.stderr
    assert not out.exists()

    pickled = tmp_path / "pickled"
    shutil.copytree(folders["sd"], pickled)
    weights = pickled / "safety_checker" / "model.safetensors"
    weights.rename(weights.with_name("pytorch_model.bin"))
    with pytest.raises(DtkError, match=r"no \.safetensors weights"):
        toolkit.safety_filter(NAME, model=pickled)
