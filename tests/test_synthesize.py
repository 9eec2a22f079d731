"""`dtk synthesize`: the plan, generation through the filters, retries, outputs, resume."""

from __future__ import annotations

import json

import pandas
import pytest
from folders import copy_subset
from invoke import dtk

import toolkit
from evaluations.synthesis import make_plan, synthesize


def frame(cells):
    """Metadata with `count` rows per (digit, group) cell."""
    rows = [{"file_name": f"{d}_{g}_{i}.png", "digit": d, "group": g}
            for (d, g), count in cells.items() for i in range(count)]  # fmt: skip
    return pandas.DataFrame(rows)


def plan_of(metadata, target, **kwargs):
    plan = make_plan(metadata, attribute="group", values=["light", "dark"], target=target,
                     by="digit", **kwargs)  # fmt: skip
    return {(r.digit, r.group): (r.have, r.want, r.generate) for r in plan.itertuples()}


def test_balanced_plan_completes_each_class_without_dropping_real_data():
    metadata = frame({("0", "light"): 10, ("0", "dark"): 2, ("1", "light"): 3, ("1", "dark"): 5})
    plan = plan_of(metadata, {"light": 0.5, "dark": 0.5})
    assert plan == {("0", "light"): (10, 10, 0), ("0", "dark"): (2, 10, 8),
                    ("1", "light"): (3, 5, 2), ("1", "dark"): (5, 5, 0)}  # fmt: skip


def test_plan_for_shares_and_for_an_empty_cell():
    metadata = frame({("0", "light"): 30, ("1", "light"): 9, ("1", "dark"): 1})
    plan = plan_of(metadata, {"light": 0.75, "dark": 0.25})
    # class 0 must reach 40 images (30 light = 75%); class 1 reaches 12 (9 light = 75%)
    assert plan[("0", "dark")] == (0, 10, 10)
    assert plan[("1", "dark")] == (1, 3, 2)
    assert plan[("0", "light")][2] == plan[("1", "light")][2] == 0


def test_budget_plan_spends_exactly_the_budget_where_the_gap_is():
    metadata = frame({("0", "light"): 20, ("0", "dark"): 2, ("1", "light"): 20, ("1", "dark"): 18})
    plan = plan_of(metadata, {"light": 0.5, "dark": 0.5}, budget=10)
    assert sum(g for _, _, g in plan.values()) == 10
    assert plan[("0", "dark")][2] == 10  # the only large deficit takes everything
    bigger = plan_of(metadata, {"light": 0.5, "dark": 0.5}, budget=40)
    assert sum(g for _, _, g in bigger.values()) == 40
    want = {cell: w for cell, (_, w, _) in bigger.items()}
    # past the deficit, the budget keeps every class at the target
    assert abs(want[("0", "dark")] - want[("0", "light")]) <= 1
    assert abs(want[("1", "dark")] - want[("1", "light")]) <= 1


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Digits 0 and 1 of the colored-digits training split: 8 light and 2 dark each."""
    root = tmp_path_factory.mktemp("synth-data")
    full = root / "full"
    toolkit.write_colored_digits(full, "train", minority_share=0.05)
    metadata = toolkit.read_metadata(full)
    keep = pandas.concat(
        metadata[(metadata.digit == d) & (metadata.group == g)].head(n)
        for d in ("0", "1") for g, n in (("light", 8), ("dark", 2))
    )  # fmt: skip
    return copy_subset(full, keep, root / "small")


def test_synthesize_end_to_end_and_resume(small_data, tmp_path):
    out = tmp_path / "synth"
    args = ["synthesize", "--data", small_data, "--steps", 8, "--out", out, "-q"]
    result = dtk(*args)
    assert result.exit_code == 0, result.output
    assert "plan (12 images to generate)" in result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["planned"] == 12
    assert saved["accepted"] + saved["shortfall"] == 12
    assert sum(r["accepted"] for r in saved["rounds"]) == saved["accepted"]
    assert {p["name"] for p in saved["plugins"]} >= {"label_consistency", "memorization"}

    synthetic = pandas.read_csv(out / "synthetic" / "metadata.csv", dtype=str)
    assert len(synthetic) == saved["accepted"]
    assert set(synthetic["synthetic"]) == {"True"}
    assert set(synthetic["group"]) == {"dark"}
    assert (synthetic["filter_label_consistency_score"].astype(float) >= 0.5).all()
    assert (synthetic["filter_memorization_score"].astype(float) >= 0.03).all()
    for name in synthetic["file_name"]:
        assert (out / "synthetic" / name).is_file()
    # the synthetic folder is a dataset folder
    assert len(toolkit.load_image_folder(out / "synthetic", ["digit", "group"])) == len(synthetic)

    combined = pandas.read_csv(out / "combined.csv", dtype=str)
    assert len(combined) == 20 + len(synthetic)
    assert combined["synthetic"].value_counts().to_dict().get("False") == 20
    assert all((out / f).is_file() for f in combined["file_name"])

    plan = pandas.read_csv(out / "plan.csv", dtype=str)
    assert plan["generated"].astype(int).sum() == saved["accepted"]

    before = {p: p.stat().st_mtime_ns for p in (out / "rounds").rglob("*.png")}
    again = dtk(*args)
    assert again.exit_code == 0, again.output
    after = {p: p.stat().st_mtime_ns for p in (out / "rounds").rglob("*.png")}
    assert after == before  # resumed: nothing regenerated
    assert pandas.read_csv(out / "synthetic" / "metadata.csv", dtype=str).equals(synthetic)


def test_rejected_samples_are_retried_and_a_shortfall_is_reported(small_data, tmp_path):
    # a threshold no sample can meet: every round rejects everything
    result = synthesize(tmp_path, data=small_data, consistency_threshold=1.0, max_rounds=2,
                        generation=toolkit.GenerationSettings(steps=4), progress=False,
                        report=False)  # fmt: skip
    assert [r.generated for r in result.rounds] == [12, 12]
    assert [r.seed_start for r in result.rounds] == [0, 12]
    assert result.accepted == 0 and result.shortfall == 12 and result.synthetic.empty
    assert result.rejections["label_consistency"] == 24
    assert result.plan["generated"].sum() == 0
    # synthesis's default guidance, added to the settings it was given
    assert (result.config.generation.guidance, result.config.generation.steps) == ("cfg", 4)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(result.to_json()))
    assert saved["config"]["generation"]["guidance_options"] == {"scale": 0.75}
    rejected = pandas.read_csv(tmp_path / "synthetic" / "rejected.csv")
    assert len(rejected) == 24 and set(rejected["round"]) == {0, 1}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--by", "colour"], "no attribute 'colour'"),
        (["--attribute", "colour"], "no attribute 'colour'"),
        (["--budget", "0"], "--budget"),
        (["--target", "light=0.9"], "sum to 1"),
        (["--filters", "nsfw"], "unknown synthesis filter 'nsfw'"),
        (["--engine", "ray", "--workers", "0"], "--workers must be at least 1"),
        (["--threads", "0"], "--threads must be a whole number >= 1"),
        (["--format", "parquet", "--shard-size", "0"], "--shard-size must be a whole number"),
        (["--shard-size", "4"], "--shard-size is for --format webdataset and parquet"),
    ],
)
def test_user_mistakes(small_data, tmp_path, args, message):
    result = dtk("synthesize", "--data", small_data, *args, "--out", tmp_path / "s", "-q")
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s").exists()  # refused before anything is written


def test_a_text_to_image_model_synthesizes_from_a_prompt_template(small_data, tmp_path):
    from tiny_sd import save_sd_pipeline

    model = save_sd_pipeline(tmp_path / "sd")
    out = tmp_path / "synth"
    # the tiny random model draws noise: threshold 0 keeps the filter's plumbing, not its bar
    result = dtk("synthesize", "--model", model, "--data", small_data, "--prompt-template",
                 "a photo of a {group} {digit}", "--negative-prompt", "blurry",
                 "--consistency-threshold", 0, "--memorization-threshold", 0, "--steps", 2,
                 "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["planned"] == saved["accepted"] == 12
    generated = pandas.read_csv(out / "rounds" / "round-0" / "metadata.csv", dtype=str)
    # the cell's values annotate each prompt: metadata columns the filters saw
    assert set(generated["prompt"]) == {"a photo of a dark 0", "a photo of a dark 1"}
    assert (generated["prompt"] == "a photo of a dark " + generated["digit"]).all()
    assert set(generated["negative_prompt"]) == {"blurry"} and set(generated["group"]) == {"dark"}
    assert generated["filter_label_consistency_score"].astype(float).between(0, 1).all()
    synthetic = pandas.read_csv(out / "synthetic" / "metadata.csv", dtype=str)
    assert synthetic.groupby(["digit", "group"]).size().to_dict() == {("0", "dark"): 6,
                                                                      ("1", "dark"): 6}  # fmt: skip


@pytest.mark.parametrize(
    ("template", "message"),
    [("a photo of a {colour}", "unknown field {colour}"), ("a photo", "names no attribute")],
)
def test_prompt_template_mistakes(small_data, tmp_path, template, message):
    result = dtk("synthesize", "--data", small_data, "--prompt-template", template,
                 "--out", tmp_path / "s", "-q")  # fmt: skip
    assert result.exit_code == 2 and message in result.output


def test_the_generation_options_reach_every_round(small_data, tmp_path):
    out = tmp_path / "synth"
    result = dtk("synthesize", "--data", small_data, "--budget", 2, "--max-rounds", 1,
                 "--filters", "", "--steps", 2, "--sampler", "euler", "--sampler-option",
                 "s_noise=0.9", "--guidance", "cfg", "--guidance-option", "scale=1.5",
                 "--dtype", "bfloat16", "--batch-size", 1, "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    run = json.loads((out / "rounds" / "round-0" / "run.json").read_text())
    assert run["sampler"] == {"name": "euler", "options": {"s_noise": 0.9}}
    assert run["guidance"] == {"name": "cfg", "options": {"scale": 1.5}}
    assert (run["dtype"], run["steps"], run["filters"]) == ("bfloat16", 2, [])
    generation = json.loads((out / "results.json").read_text())["config"]["generation"]
    assert (generation["dtype"], generation["batch_size"]) == ("bfloat16", 1)
