"""`dtk data colored-digits`: splits, minority share, format, determinism, and groups that
no global color transform maps onto each other."""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import pandas
import pytest
from invoke import dtk

from toolkit.data.dataset_folder import load_image_folder
from toolkit.data.images import encode_png
from toolkit.errors import DtkError
from toolkit.recipes import colored_digits as cd

N_SHAPES = 1797
N_TEST_SHAPES = 10 * cd.TEST_PER_DIGIT


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The train (default options) and test splits, written by the command line."""
    root = tmp_path_factory.mktemp("colored-digits")
    made = {}
    for split, args in (("train", ()), ("test", ("--split", "test"))):
        result = dtk("data", "colored-digits", root / split, *args, "-q")
        assert result.exit_code == 0, result.output
        assert result.stdout == ""  # the summary goes to stderr
        made[split] = root / split
    return made


def read(folder) -> pandas.DataFrame:
    return pandas.read_csv(folder / "metadata.csv")


def digests(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# -- the train split -----------------------------------------------------------------------


def test_train_split_has_the_promised_columns_and_minority_share(folders):
    metadata = read(folders["train"])
    assert list(metadata.columns) == ["file_name", "digit", "group", "split", "source_index"]
    assert set(metadata["split"]) == {"train"}
    assert sorted(metadata["digit"].unique()) == list(range(10))
    assert len(metadata) == N_SHAPES - N_TEST_SHAPES  # every training shape once
    assert metadata["source_index"].is_unique
    dark = int((metadata["group"] == "dark").sum())
    assert set(metadata["group"]) == {"light", "dark"}
    assert dark == math.floor(0.05 * len(metadata) + 0.5) == 68
    assert abs(dark / len(metadata) - 0.05) < 1 / len(metadata)


@pytest.mark.parametrize("share", [0.0, 0.01, 0.05, 0.2, 0.5])
def test_minority_share_is_exact_and_spread_over_the_digits(share):
    rows = pandas.DataFrame(cd.rows("train", share, seed=3))
    dark = rows[rows["group"] == "dark"]
    assert len(dark) == math.floor(share * len(rows) + 0.5)
    per_digit = rows.groupby("digit").size()
    dark_per_digit = dark.groupby("digit").size().reindex(range(10), fill_value=0)
    assert (abs(dark_per_digit - share * per_digit) < 1).all(), dark_per_digit.tolist()


def test_the_written_folder_is_a_dataset_folder(folders):
    dataset = load_image_folder(folders["train"], ["digit", "group"])
    assert tuple(dataset.images.shape[1:]) == (3, 16, 16)
    assert dataset.values("group") == ["dark", "light"]
    for row in read(folders["train"]).head(20).itertuples():
        assert row.file_name == f"{row.digit}_{row.group}/{row.source_index:04d}.png"
    info = json.loads((folders["train"] / "dataset.json").read_text())
    assert info["command"] == (
        f"dtk data colored-digits {folders['train']} --split train --minority-share 0.05 --seed 0"
    )
    assert (info["seed"], info["minority_share"], info["minority_group"]) == (0, 0.05, "dark")
    assert info["counts"] == {"light": 1299, "dark": 68}


def test_datasets_imagefolder_reads_it(folders):
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset("imagefolder", data_dir=str(folders["test"]), split="train")
    assert len(loaded) == 2 * N_TEST_SHAPES
    assert {"digit", "group", "source_index"} <= set(loaded.column_names)
    assert loaded[0]["image"].size == (16, 16)


# -- the test split and the holdout ----------------------------------------------------------


def test_test_split_is_balanced_across_digits_and_groups(folders):
    metadata = read(folders["test"])
    assert set(metadata["split"]) == {"test"}
    cells = metadata.groupby(["digit", "group"]).size()
    assert len(cells) == 20 and set(cells) == {cd.TEST_PER_DIGIT}
    # each held-out shape is drawn once in each group
    assert set(metadata.groupby("source_index")["group"].apply(frozenset)) == {
        frozenset({"light", "dark"})
    }


def test_no_shape_is_in_both_train_and_test(folders):
    train = set(read(folders["train"])["source_index"])
    test = set(read(folders["test"])["source_index"])
    assert not train & test
    assert len(train | test) == N_SHAPES
    balanced = pd_rows("train-balanced")
    assert set(balanced["source_index"]) == train
    assert (balanced.groupby("group").size() == len(train)).all()


def pd_rows(split: str, **kwargs) -> pandas.DataFrame:
    return pandas.DataFrame(cd.rows(split, **kwargs))


def test_the_holdout_does_not_depend_on_the_seed():
    for seed in (0, 1, 7):
        assert set(pd_rows("test", seed=seed)["source_index"]) == set(
            pd_rows("test")["source_index"]
        )
    train0 = pd_rows("train", seed=0)
    train1 = pd_rows("train", seed=1)
    assert set(train0["source_index"]) == set(train1["source_index"])
    minority = [set(t.loc[t["group"] == "dark", "source_index"]) for t in (train0, train1)]
    assert minority[0] != minority[1]  # the seed picks the minority shapes


# -- determinism -----------------------------------------------------------------------------


def test_same_command_same_bytes_and_reruns_in_place(folders, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # bytes matter here, not durability
    again = tmp_path / "again"
    assert dtk("data", "colored-digits", again, "-q").exit_code == 0
    first = digests(folders["train"])
    second = digests(again)
    del first["dataset.json"], second["dataset.json"]  # they name their folder
    assert first == second
    before = digests(again)
    result = dtk("data", "colored-digits", again, "-q")
    assert result.exit_code == 0, result.output
    assert digests(again) == before


def test_a_shape_looks_the_same_in_every_split(folders):
    """A train image is the render of its shape and group; train-balanced holds the same
    files (same names, same renders), so it contains every train image."""
    train = read(folders["train"])
    for row in train.sample(30, random_state=0).itertuples():
        written = (folders["train"] / row.file_name).read_bytes()
        assert written == encode_png(cd.render(row.source_index, row.group, seed=0))
    assert set(train["file_name"]) < set(pd_rows("train-balanced")["file_name"])


def test_the_seed_changes_the_grain_only_of_the_dark_group():
    assert (cd.render(5, "light", seed=0) == cd.render(5, "light", seed=1)).all()
    assert (cd.render(5, "dark", seed=0) != cd.render(5, "dark", seed=1)).any()
    assert (cd.render(5, "dark", seed=2) == cd.render(5, "dark", seed=2)).all()


# -- the groups differ in more than color ----------------------------------------------------


def pixels(group: str, shapes) -> np.ndarray:
    """Every pixel of `shapes` drawn in `group`, as rows of RGB in [0, 1]."""
    return np.concatenate([cd.render(i, group).reshape(-1, 3) for i in shapes]) / 255


def unexplained_by_affine(source: np.ndarray, target: np.ndarray) -> float:
    """Share of target's variance left by the best global affine color map (3x3 matrix plus
    offset: covers inversion, channel mixing, brightness/contrast/hue jitter)."""
    design = np.c_[source, np.ones(len(source))]
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    return float(((target - design @ coef).var(0) / target.var(0)).mean())


def unexplained_by_any_function(source: np.ndarray, target: np.ndarray, bins: int = 32) -> float:
    """Share of target's variance left by the best arbitrary function of a pixel's color
    (any tone curve or lookup table): the mean target color per source color bin."""
    cells = np.floor(source * (bins - 1e-9)).astype(int) @ np.array([bins * bins, bins, 1])
    _, key = np.unique(cells, return_inverse=True)
    counts = np.bincount(key)
    means = np.stack([np.bincount(key, target[:, c]) / counts for c in range(3)], 1)
    return float(((target - means[key]).var(0) / target.var(0)).mean())


@pytest.fixture(scope="module")
def group_pixels():
    shapes = np.arange(0, N_SHAPES, 9)  # 200 shapes, each drawn in both groups
    return pixels("light", shapes), pixels("dark", shapes)


def test_no_global_color_transform_maps_one_group_onto_the_other(group_pixels):
    light, dark = group_pixels
    assert unexplained_by_affine(light, dark) > 0.4
    assert unexplained_by_affine(dark, light) > 0.3
    assert unexplained_by_any_function(light, dark) > 0.3
    assert unexplained_by_any_function(dark, light) > 0.2


def test_the_measure_would_catch_a_color_only_difference(group_pixels):
    light, _ = group_pixels
    # the light images recolored into the dark palette, and inverted: color tricks
    paper = np.asarray(cd.STYLES["light"].paper)
    ink = np.asarray(cd.STYLES["light"].ink)
    coverage = (light - paper) / (ink - paper)
    recolored = cd.STYLES["dark"].paper + coverage * (
        np.asarray(cd.STYLES["dark"].ink) - cd.STYLES["dark"].paper
    )
    for trick in (recolored, 1 - light):
        assert unexplained_by_affine(light, trick) < 1e-3
        assert unexplained_by_any_function(light, trick) < 1e-2


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--minority-share", "0.7"), "--minority-share must be between 0 and 0.5, got 0.7"),
        (("--minority-share", "-0.1"), "--minority-share must be between 0 and 0.5"),
        (("--minority-share", "nan"), "--minority-share must be between 0 and 0.5"),
        (("--split", "test", "--minority-share", "0.1"), "applies to --split train only"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, args, message):
    result = dtk("data", "colored-digits", tmp_path / "out", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--seed", "-1"), "--seed must be a whole number >= 0, got -1"),
        (("--seed", str(2**64)), "--seed 18446744073709551616 is too large"),
        (("--seed", "9" * 30), "is too large"),
    ],
)
def test_out_of_range_seeds_are_one_line_errors(tmp_path, args, message):
    result = dtk("data", "colored-digits", tmp_path / "out", "-q", *args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_python_callers_get_the_same_seed_check(tmp_path):
    with pytest.raises(DtkError, match="--seed must be a whole number >= 0"):
        cd.write(tmp_path / "out", "test", seed=-1)
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("mine")
    result = dtk("data", "colored-digits", tmp_path / "file", "-q")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"Error: OUT {tmp_path / 'file'} exists "
                                                  "and is not a folder"]  # fmt: skip
    assert (tmp_path / "file").read_text() == "mine"


def test_an_unknown_split_is_refused(tmp_path):
    result = dtk("data", "colored-digits", tmp_path / "out", "--split", "validation")
    assert result.exit_code == 2
    assert "train-balanced" in result.stderr


def test_a_folder_holding_something_else_is_refused(folders, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    result = dtk("data", "colored-digits", other)
    assert result.exit_code == 2
    assert "not empty" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]

    result = dtk("data", "colored-digits", folders["train"], "--seed", "1")
    assert result.exit_code == 2
    assert "holds a different colored-digits dataset (different seed)" in result.stderr

    a_file = tmp_path / "file"
    a_file.write_text("")
    assert dtk("data", "colored-digits", a_file).exit_code == 2
