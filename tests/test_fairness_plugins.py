"""Targets, the `fair` guidance plugin, and the `label_consistency` / `memorization` filters."""

from __future__ import annotations

import math

import numpy as np
import pandas
import pytest
from folders import pixels
from tiny_models import save_pipeline

import toolkit
from toolkit.conditions.targets import quantile_draw, seeded_uniform
from toolkit.sampling.safety import SampleRequest


@pytest.fixture(scope="module")
def cond_model(tmp_path_factory):
    return save_pipeline(tmp_path_factory.mktemp("models") / "cond", conditional=True)


# --- targets -------------------------------------------------------------------------------


def test_target_spellings():
    assert toolkit.target_distribution("uniform", ["a", "b"]) == {"a": 0.5, "b": 0.5}
    assert toolkit.target_distribution("balanced", ["a", "b", "c"])["c"] == pytest.approx(1 / 3)
    shares = toolkit.target_distribution("b=0.25, a=0.75", ["a", "b"])
    assert list(shares) == ["a", "b"] and shares == {"a": 0.75, "b": 0.25}
    # values left out get 0; shares within 0.01 of 1 are renormalised exactly
    shares = toolkit.target_distribution({"a": 0.995}, ["a", "b"])
    assert shares == {"a": 1.0, "b": 0.0}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("a=0.5,z=0.5", "unknown value 'z'"),
        ("a=0.7,b=0.7", "sum to 1"),
        ("a=-0.5,b=1.5", ">= 0"),
        ("a=x,b=1", "must be numbers"),
        ("a0.5", "VALUE=SHARE"),
        ("a=0.5,a=0.5", "given twice"),
    ],
)
def test_bad_targets_are_clear_errors(spec, message):
    with pytest.raises(toolkit.DtkError, match=message):
        toolkit.target_distribution(spec, ["a", "b"])


@pytest.mark.parametrize("start", [0, 1000, 123456])
@pytest.mark.parametrize("p", [0.5, 0.3, 0.05])
def test_seeded_draws_match_the_target_far_better_than_chance(start, p):
    n = 400
    draws = [quantile_draw(seeded_uniform(s, "group"), {"x": p, "y": 1 - p})
             for s in range(start, start + n)]  # fmt: skip
    share = draws.count("x") / n
    # independent draws would have a standard error sqrt(p(1-p)/n) (0.025 at p=0.5)
    assert abs(share - p) <= 3 / n


def test_seeded_uniform_is_a_function_of_the_seed_and_salt():
    assert seeded_uniform(7, "group") == seeded_uniform(7, "group")
    assert seeded_uniform(7, "group") != seeded_uniform(7, "digit")
    values = [seeded_uniform(s) for s in range(1000)]
    assert min(values) >= 0 and max(values) < 1


# --- fair guidance -----------------------------------------------------------------------


def test_fair_guidance_draws_the_target_and_guides_towards_it(cond_model, tmp_path):
    common = {"n": 60, "steps": 3, "sampler": "ddim", "schedule": "leading", "progress": False}
    fair = toolkit.generate(
        cond_model, out=tmp_path / "fair", conditions={"digit": "1"}, guidance="fair",
        guidance_options={"attribute": "group", "target": "light=0.25,dark=0.75", "scale": 3.0},
        **common,
    )  # fmt: skip
    assert set(fair["digit"]) == {"1"}
    share = (fair["group"] == "dark").mean()
    assert abs(share - 0.75) <= 3 / 60
    # each sample is plain CFG (same scale) towards its drawn condition, seed for seed
    conditions = [{"digit": "1", "group": g} for g in fair.sort_values("index")["group"]]
    cfg = toolkit.generate(
        cond_model, out=tmp_path / "cfg", conditions=conditions, guidance="cfg",
        guidance_options={"scale": 3.0}, **common,
    )  # fmt: skip
    a, b = pixels(tmp_path / "fair", fair), pixels(tmp_path / "cfg", cfg)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[i], b[i]) for i in a)


def test_fair_draws_do_not_depend_on_batch_size_or_shard(cond_model, tmp_path):
    options = {"guidance": "fair", "n": 12, "steps": 2, "progress": False}
    whole = toolkit.generate(cond_model, out=tmp_path / "a", batch_size=5, **options)
    parts = [
        toolkit.generate(cond_model, out=tmp_path / f"s{k}", shard=f"{k}/2", **options)
        for k in range(2)
    ]
    drawn = pandas.concat(parts).set_index("index")["group"].sort_index()
    assert drawn.to_dict() == whole.set_index("index")["group"].to_dict()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"conditions": {"group": "dark"}}, "already fixes group=dark"),
        ({"guidance_options": {"attribute": "colour"}}, "no attribute 'colour'"),
        ({"guidance_options": {"target": "light=0.2"}}, "sum to 1"),
    ],
)
def test_fair_guidance_errors(cond_model, tmp_path, kwargs, message):
    with pytest.raises(toolkit.DtkError, match=message):
        toolkit.generate(cond_model, out=tmp_path / "x", guidance="fair", n=2, steps=2,
                         progress=False, **kwargs)  # fmt: skip
    assert not (tmp_path / "x").exists()


# --- synthesis filters -------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    toolkit.write_colored_digits(root / "train", "train", minority_share=0.05)
    toolkit.write_colored_digits(root / "test", "test")
    return {
        "train": root / "train",
        "train_data": toolkit.load_image_folder(root / "train", ["digit", "group"]),
        "test_data": toolkit.load_image_folder(root / "test", ["digit", "group"]),
    }


def _requests(metadata, override=None):
    return [
        SampleRequest(i, i, {"digit": str(r.digit), "group": override or str(r.group)})
        for i, r in enumerate(metadata.itertuples())
    ]


def test_label_consistency_confirms_true_labels_and_flags_wrong_ones(digits):
    data = digits["test_data"]
    pick = np.arange(0, len(data), 3)
    images, metadata = data.images[pick], data.metadata.iloc[pick]
    flt = toolkit.safety_filter("label_consistency", attributes=["digit", "group"])
    verdicts = flt(images, _requests(metadata))
    assert sum(v.flagged for v in verdicts) <= 0.05 * len(pick)  # real images mostly pass
    # flagged exactly when a requested value's probability is below the threshold
    lowest = np.ones(len(pick))
    for attribute in ("digit", "group"):
        clf = toolkit.attribute_classifier("cnn", attribute=attribute)
        p = clf.predict_proba(images).numpy()
        wanted = [clf.labels.index(str(v)) for v in metadata[attribute]]
        lowest = np.minimum(lowest, p[np.arange(len(pick)), wanted])
    assert [v.flagged for v in verdicts] == list(lowest < 0.5)
    assert [v.score for v in verdicts] == pytest.approx(lowest.tolist(), abs=1e-6)
    # asking every image for the same group: the other group's images are flagged, and the
    # score is the classifier's probability of the requested value
    wrong = flt(images, _requests(metadata, override="dark"))
    is_light = (metadata["group"] == "light").to_numpy()
    assert all(v.flagged for v, light in zip(wrong, is_light) if light)
    group = toolkit.attribute_classifier("cnn", attribute="group")
    p_dark = group.predict_proba(images)[:, group.labels.index("dark")]
    for v, p, light in zip(wrong, p_dark.tolist(), is_light):
        if light:
            assert v.score == pytest.approx(p, abs=1e-6)
    # a request that leaves the attribute unspecified is not judged
    blank = flt.__class__(attributes=["group"])(images[:2], [SampleRequest(0, 0, {})] * 2)
    assert [(v.flagged, v.score) for v in blank] == [(False, None)] * 2


def test_memorization_flags_copies_and_scores_rms_distance(digits):
    flt = toolkit.safety_filter("memorization", data=digits["train"], threshold=0.03)
    train, test = digits["train_data"].images, digits["test_data"].images
    copies = flt(train[:5], [SampleRequest(i, i, {}) for i in range(5)])
    assert all(v.flagged and v.score == pytest.approx(0, abs=1e-6) for v in copies)
    assert "copy of" in copies[0].reason
    fresh = flt(test[:50], [SampleRequest(i, i, {}) for i in range(50)])
    assert sum(v.flagged for v in fresh) <= 1  # held-out shapes are not copies
    flat = train.flatten(1)
    expected = ((test[:50].flatten(1)[:, None] - flat[None]) ** 2).mean(-1).sqrt().min(1).values
    assert [v.score for v in fresh] == pytest.approx(expected.tolist(), abs=1e-5)
    assert math.isfinite(fresh[0].score)


def test_filter_option_errors(digits, tmp_path):
    with pytest.raises(toolkit.OptionError, match="threshold"):
        toolkit.safety_filter("label_consistency", threshold=2.0)
    with pytest.raises(toolkit.DtkError, match="not a dataset folder"):
        toolkit.safety_filter("memorization", data=tmp_path)
    with pytest.raises(toolkit.OptionError, match="data"):
        toolkit.safety_filter("memorization")
