"""Downstream fairness: evaluation against pandas, oversampling counts, paired gap reduction,
t-intervals against scipy, determinism, skipping, and end-to-end runs on colored digits."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pandas as pd
import pytest
import torch
from folders import copy_subset
from invoke import dtk
from scipy import stats

import toolkit
from evaluations import downstream as ds


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The real colored-digits train and test splits, and a synthetic stand-in: minority
    ('dark') images of other shapes and grain, marked synthetic like `dtk synthesize`'s."""
    root = tmp_path_factory.mktemp("downstream")
    for name, args in (
        ("train", ["--split", "train"]),
        ("test", ["--split", "test"]),
        ("extra", ["--split", "train", "--minority-share", 0.5, "--seed", 1]),
    ):
        result = dtk("data", "colored-digits", root / name, *args, "-q")
        assert result.exit_code == 0, result.output
    extra = toolkit.read_metadata(root / "extra", ["digit", "group"])
    dark = extra[extra["group"] == "dark"].assign(synthetic="True")
    synthetic = copy_subset(root / "extra", dark, root / "synthetic")
    return {"train": root / "train", "test": root / "test", "synthetic": synthetic}


def tiny_dataset(n: int, seed: int, size: int = 24) -> toolkit.ImageDataset:
    """Noisy images of another size than 16x16 whose digit (0-2) shows faintly as a tint of
    one channel, so that a few steps of training give seed-dependent predictions."""
    rng = np.random.default_rng(seed)
    digits = np.arange(n) % 3
    metadata = pd.DataFrame(
        {
            "file_name": [f"{i}.png" for i in range(n)],
            "digit": digits.astype(str),
            "group": ["dark" if i % 4 == 0 else "light" for i in range(n)],
        }
    )
    images = rng.random((n, 3, size, size), dtype=np.float32) * 0.8
    images[np.arange(n), digits] += 0.2
    return toolkit.ImageDataset(root=f"tiny-{seed}", images=torch.from_numpy(images),
                                metadata=metadata)  # fmt: skip


# --------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_small_fixture_by_hand():
    y_true = [0, 1, 2, 0, 1, 2, 0]
    y_pred = [0, 1, 0, 0, 2, 2, 1]
    groups = ["a", "a", "a", "b", "b", "b", "b"]
    figures = ds.evaluate(y_true, y_pred, groups)
    assert figures["by_group"] == pytest.approx({"a": 2 / 3, "b": 2 / 4})
    assert figures["overall"] == pytest.approx(4 / 7)
    assert figures["worst_group"] == pytest.approx(1 / 2)
    assert figures["gap"] == pytest.approx(2 / 3 - 1 / 2)


def test_evaluate_matches_pandas_groupby():
    rng = np.random.default_rng(3)
    n = 500
    y_true = rng.integers(0, 10, n)
    # Each group gets its own error rate, so the per-group accuracies really differ.
    groups = rng.choice(["light", "dark", "mid"], n, p=[0.7, 0.1, 0.2])
    error = np.select([groups == "light", groups == "dark"], [0.1, 0.5], 0.3)
    wrong = rng.random(n) < error
    y_pred = np.where(wrong, (y_true + rng.integers(1, 10, n)) % 10, y_true)
    figures = ds.evaluate(y_true, y_pred, groups)
    frame = pd.DataFrame({"correct": y_true == y_pred, "group": groups})
    by_group = frame.groupby("group")["correct"].mean()
    assert figures["by_group"] == pytest.approx(by_group.to_dict())
    assert list(figures["by_group"]) == ["dark", "light", "mid"]
    assert figures["overall"] == pytest.approx(frame["correct"].mean())
    assert figures["worst_group"] == pytest.approx(by_group.min())
    assert figures["gap"] == pytest.approx(by_group.max() - by_group.min())


# --------------------------------------------------------------------------------------------
# oversample_index


def test_oversample_balances_groups_within_each_label():
    labels = np.array([0] * 10 + [0] * 3 + [1] * 4 + [1] * 4 + [2] * 5 + [2] * 1 + [2] * 2)
    groups = np.array(["l"] * 10 + ["d"] * 3 + ["l"] * 4 + ["d"] * 4 + ["l"] * 5 + ["d"] * 1
                      + ["m"] * 2)  # fmt: skip
    index = ds.oversample_index(labels, groups, seed=0)
    counts = pd.Series(1, index=pd.MultiIndex.from_arrays([labels[index], groups[index]]))
    counts = counts.groupby(level=[0, 1]).size().to_dict()
    assert counts == {
        (0, "d"): 10, (0, "l"): 10,
        (1, "d"): 4, (1, "l"): 4,
        (2, "d"): 5, (2, "l"): 5, (2, "m"): 5,
    }  # fmt: skip
    # Every original row survives; the copies of a cell differ by at most one in number.
    uses = np.bincount(index, minlength=len(labels))
    assert uses.min() >= 1
    for label in (0, 1, 2):
        for group in set(groups[labels == label]):
            cell = uses[(labels == label) & (groups == group)]
            assert cell.max() - cell.min() <= 1
    assert np.array_equal(index, ds.oversample_index(labels, groups, seed=0))


def test_oversample_leaves_an_absent_group_absent():
    labels = np.array([0, 0, 0, 1, 1])
    groups = np.array(["l", "l", "d", "l", "l"])
    index = ds.oversample_index(labels, groups, seed=1)
    assert sorted(zip(labels[index].tolist(), groups[index].tolist())) == [
        (0, "d"), (0, "d"), (0, "l"), (0, "l"), (1, "l"), (1, "l"),
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------
# color_jitter


def test_color_jitter_keeps_range_and_gray_and_is_seeded():
    images = torch.rand(16, 3, 8, 8)
    out = ds.color_jitter(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, images)
    assert torch.equal(out, ds.color_jitter(images, torch.Generator().manual_seed(0)))
    # None of the four operations may tint a gray pixel.
    gray = torch.rand(16, 1, 8, 8).expand(-1, 3, -1, -1)
    jittered = ds.color_jitter(gray, torch.Generator().manual_seed(1))
    assert torch.allclose(jittered, jittered[:, :1].expand(-1, 3, -1, -1), atol=1e-5)
    same = ds.color_jitter(images, torch.Generator(), brightness=0, contrast=0, saturation=0,
                           hue=0)  # fmt: skip
    assert torch.allclose(same, images, atol=1e-6)


# --------------------------------------------------------------------------------------------
# statistics


@pytest.mark.parametrize("values", [[0.1, 0.3], [0.2, 0.25, 0.4, 0.31, 0.05], [-1.0, 3.0, 2.0]])
def test_t_interval_matches_scipy(values):
    n = len(values)
    expected = stats.t.interval(0.95, n - 1, loc=np.mean(values), scale=stats.sem(values))
    assert ds.t_interval(values) == pytest.approx(expected)
    expected_90 = stats.t.interval(0.9, n - 1, loc=np.mean(values), scale=stats.sem(values))
    assert ds.t_interval(values, 0.9) == pytest.approx(expected_90)


def test_t_interval_degenerate_cases():
    assert ds.t_interval([0.4]) == (None, None)
    assert ds.t_interval([]) == (None, None)
    assert ds.t_interval([0.2, 0.2, 0.2]) == pytest.approx((0.2, 0.2))


def test_gap_reduction_is_paired_by_seed():
    # With these gaps the mean of per-seed ratios differs from the ratio of mean gaps, so an
    # unpaired computation (or one pairing the wrong seeds) gives another figure.
    gaps = {"real": [0.2, 0.6, 0.1], "synthetic": [0.1, 0.3, 0.02], "oversample": [0.2, 0.1, 0.05]}
    runs = pd.DataFrame(
        [
            {
                "model": "cnn",
                "method": method,
                "seed": seed,
                "overall": 0.9,
                "worst_group": 0.8,
                "gap": gap,
            }
            for method, values in gaps.items()
            for seed, gap in zip([0, 1, 2], values)
        ]
    ).sample(frac=1, random_state=0)
    summary = ds.summarize_runs(runs, methods=list(gaps)).set_index("method")
    for method in ("synthetic", "oversample"):
        per_seed = 1 - np.array(gaps[method]) / np.array(gaps["real"])
        row = summary.loc[method]
        assert row["gap_reduction_mean"] == pytest.approx(per_seed.mean())
        low, high = stats.t.interval(0.95, 2, loc=per_seed.mean(), scale=stats.sem(per_seed))
        assert (row["gap_reduction_ci_low"], row["gap_reduction_ci_high"]) == pytest.approx(
            (low, high)
        )
    unpaired = 1 - np.mean(gaps["oversample"]) / np.mean(gaps["real"])
    assert summary.loc["oversample", "gap_reduction_mean"] != pytest.approx(unpaired, abs=0.05)
    real = summary.loc["real"]
    assert (real["gap_reduction_mean"], real["gap_reduction_ci_low"]) == (0, 0)


def test_gap_reduction_leaves_out_seeds_without_a_real_gap():
    runs = pd.DataFrame(
        {
            "model": "cnn",
            "method": ["real", "real", "jitter", "jitter"],
            "seed": [0, 1, 0, 1],
            "overall": 0.9,
            "worst_group": 0.9,
            "gap": [0.0, 0.4, 0.1, 0.1],
        }
    )
    row = ds.summarize_runs(runs).set_index("method").loc["jitter"]
    assert row["gap_reduction_mean"] == pytest.approx(0.75)
    assert pd.isna(row["gap_reduction_ci_low"])  # one usable seed: no interval
    no_real = ds.summarize_runs(runs[runs["method"] == "jitter"])
    assert no_real["gap_reduction_mean"].isna().all()


# --------------------------------------------------------------------------------------------
# run_downstream on small in-memory data


def test_same_seeds_give_identical_runs():
    real, test, synthetic = tiny_dataset(40, 0), tiny_dataset(24, 1), tiny_dataset(20, 2)
    kwargs = dict(seeds=[0, 3], steps=4, batch_size=8, progress=False)
    first = ds.run_downstream(real, test, synthetic, **kwargs)
    second = ds.run_downstream(real, test, synthetic, **kwargs)
    assert len(first.runs) == 5 * 2
    pd.testing.assert_frame_equal(first.runs, second.runs)
    pd.testing.assert_frame_equal(first.summary, second.summary)
    # Not vacuous: the figures move with the seed.
    by_seed = first.runs.pivot(index="method", columns="seed", values="overall")
    assert not np.allclose(by_seed[0], by_seed[3])
    # Oversampling changes the training data, so its runs must not all copy the real ones.
    figures = ["overall", "accuracy_dark", "accuracy_light"]
    by_method = first.runs.set_index(["model", "seed", "method"])[figures].unstack("method")
    assert not by_method.xs("real", axis=1, level=1).equals(
        by_method.xs("oversample", axis=1, level=1)
    )


def test_synthetic_methods_are_skipped_and_reported_without_synthetic_data():
    real, test = tiny_dataset(30, 0), tiny_dataset(12, 1)
    threads = torch.get_num_threads()
    result = ds.run_downstream(real, test, models=("logreg",), seeds=1, steps=4,
                               batch_size=8, progress=False, threads=1)  # fmt: skip
    assert torch.get_num_threads() == threads  # restored
    assert set(result.skipped) == {"synthetic", "pretrain_finetune"}
    assert all("synthetic" in reason for reason in result.skipped.values())
    assert result.runs["method"].tolist() == ["real", "oversample", "jitter"]
    assert result.to_json()["skipped"] == result.skipped
    assert result.config.methods == ["real", "oversample", "jitter"]
    # One seed: no interval anywhere.
    assert result.summary["gap_ci_low"].isna().all()
    assert all(row["gap_ci_low"] is None for row in result.to_json()["summary"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"methods": ["real", "smote"]}, "unknown method 'smote'"),
        ({"models": ["resnet"]}, "unknown model 'resnet'"),
        ({"label": "colour"}, "no 'colour' column"),
        ({"steps": 1}, "steps must be at least 2"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs, message):
    with pytest.raises(toolkit.DtkError, match=message):
        ds.run_downstream(tiny_dataset(8, 0), tiny_dataset(8, 1), progress=False, **kwargs)


# --------------------------------------------------------------------------------------------
# end to end on colored digits


def test_end_to_end_on_colored_digit_folders(folders):
    result = ds.run_downstream(
        folders["train"], folders["test"], folders["synthetic"],
        models=("logreg", "cnn"), seeds=2, steps=2, batch_size=32, progress=False,
    )  # fmt: skip
    runs = result.runs
    assert len(runs) == 2 * 5 * 2
    assert list(runs.columns) == ["model", "method", "seed", "overall", "worst_group", "gap",
                                  "accuracy_dark", "accuracy_light"]  # fmt: skip
    # The test split is balanced, so overall accuracy is the mean of the two groups'.
    groups = runs[["accuracy_dark", "accuracy_light"]]
    assert np.allclose(runs["overall"], groups.mean(axis=1))
    assert np.allclose(runs["worst_group"], groups.min(axis=1))
    assert np.allclose(runs["gap"], (groups["accuracy_dark"] - groups["accuracy_light"]).abs())
    assert result.summary[["model", "method"]].values.tolist() == [
        [model, method] for model in ("logreg", "cnn") for method in ds.METHODS
    ]
    assert result.config.sizes == {"real": 1367, "synthetic": 684, "test": 860}
    assert result.config.real_group_counts == {"dark": 68, "light": 1299}
    assert result.config.groups == ["dark", "light"]
    assert result.skipped == {}
    data = result.to_json()
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text) == data
    for row in data["summary"]:
        for key, value in row.items():
            assert value is None or isinstance(value, (str, int, float)), key
            assert not (isinstance(value, float) and math.isnan(value))


def test_synthetic_minority_data_narrows_the_logreg_gap(folders):
    # Pixel-wise logistic regression sees 68 minority images against 1299: its real-only gap
    # is wide, and adding minority images of other shapes must narrow it.
    result = ds.run_downstream(
        folders["train"], folders["test"], folders["synthetic"], models=("logreg",),
        methods=("real", "synthetic"), seeds=2, steps=40, batch_size=128, progress=False,
    )  # fmt: skip
    summary = result.summary.set_index("method")
    assert summary.loc["real", "gap_mean"] > 0.3
    assert summary.loc["synthetic", "gap_mean"] < summary.loc["real", "gap_mean"] / 2
    assert summary.loc["synthetic", "worst_group_mean"] > summary.loc["real", "worst_group_mean"]
    assert summary.loc["synthetic", "gap_reduction_mean"] > 0.5


def test_the_command_writes_results_summary_and_report(folders, tmp_path):
    out = tmp_path / "downstream"
    result = dtk("eval", "downstream", "--real", folders["train"], "--test", folders["test"],
                    "--synthetic", folders["synthetic"], "--models", "logreg", "--seeds", 2,
                    "--steps", 20, "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "real + synthetic" in result.output  # the summary table on stderr
    saved = json.loads((out / "results.json").read_text())
    assert saved["command"] == "eval downstream" and saved["groups"] == ["dark", "light"]
    methods = {row["method"] for row in saved["summary"]}
    assert methods == {"real", "oversample", "jitter", "synthetic", "pretrain_finetune"}
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 10 and set(runs["seed"]) == {0, 1}
    by_group = {(r["method"]): r for r in saved["accuracy_by_group"]}
    real_runs = runs[runs["method"] == "real"]
    assert by_group["real"]["accuracy_dark_mean"] == pytest.approx(
        real_runs["accuracy_dark"].mean()
    )
    for name in ("summary.csv", "report.html", "report.md"):
        assert (out / name).is_file()


def test_the_command_refuses_synthetic_methods_without_synthetic_data(folders, tmp_path):
    result = dtk("eval", "downstream", "--real", folders["train"], "--test", folders["test"],
                    "--methods", "real,synthetic", "--out", tmp_path / "d", "-q")  # fmt: skip
    assert result.exit_code == 2
    assert "method 'synthetic' needs --synthetic DIR" in result.output


def test_the_default_methods_without_synthetic_data_say_what_was_not_run(folders, tmp_path):
    out = tmp_path / "d"
    result = dtk("eval", "downstream", "--real", folders["train"], "--test", folders["test"],
                 "--models", "logreg", "--seeds", 1, "--steps", 4, "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert {row["method"] for row in saved["summary"]} == {"real", "oversample", "jitter"}
    assert set(saved["skipped"]) == {"synthetic", "pretrain_finetune"}
    assert "Not run: `synthetic`: no synthetic data given" in (out / "report.md").read_text()


def test_results_and_report_name_the_folders_as_given(folders, tmp_path, monkeypatch):
    # a relative pathlib.Path has root "" (an absolute one "/"): the folder is the path itself
    from evaluations.downstream_job import evaluate_downstream

    monkeypatch.chdir(tmp_path)
    for name in ("train", "test", "synthetic"):
        (tmp_path / name).symlink_to(folders[name], target_is_directory=True)
    test = toolkit.load_image_folder(pathlib.Path("test"), ["digit", "group"])
    evaluation = evaluate_downstream(pathlib.Path("out"), pathlib.Path("train"), test,
                                     "synthetic", models=("logreg",), methods=("real", "synthetic"),
                                     seeds=1, steps=2, progress=False)  # fmt: skip
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved == json.loads(json.dumps(evaluation.to_json()))
    config = saved["config"]
    assert (config["real"], config["test"], config["synthetic"]) == ("train", "test", "synthetic")
    assert [evaluation.real, evaluation.test, evaluation.synthetic] == ["train", "test",
                                                                        "synthetic"]  # fmt: skip
    assert evaluation.config.label == config["label"] == "digit"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "tested on `test`; the gap is" in report
    # the report's title says "Downstream fairness"; no section repeats it
    assert report.count("Downstream fairness") == 1
