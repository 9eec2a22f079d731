"""Sharded dataset folders (``--format webdataset | parquet``) wherever dtk reads a dataset
folder: loading, audits with their galleries, label sheets and human labels, and
``dtk synthesize --format``, whose rounds and synthetic folder are sharded; each compared
with the same data as an imagefolder."""

from __future__ import annotations

import hashlib
import json
import re

import datasets
import numpy as np
import pandas
import pytest
from folders import copy_subset, raw_shard_images
from invoke import dtk
from PIL import Image
from threads import torch_threads

import toolkit
from toolkit.data import shards

SHARDED = ("webdataset", "parquet")


def raw_images(folder):
    """index -> PNG bytes of every shard in `folder`, read without dtk's code."""
    return raw_shard_images(sorted(folder.glob("train-*")))


def shard_copy(source, out, fmt, shard_size=7, reverse=False):
    """`source` (an imagefolder dataset folder) as a sharded one of `fmt`: the same PNG bytes
    in shards, and a metadata.csv naming each row's shard and index (`reverse`: listed in
    reverse, so rows are not in the shards' order)."""
    metadata = toolkit.read_metadata(source)
    samples = ((dict(row, index=i), (source / row["file_name"]).read_bytes())
               for i, row in enumerate(metadata.to_dict("records")))  # fmt: skip
    records = toolkit.write_shards(out, fmt, samples, shard_size=shard_size)
    pandas.DataFrame(records[::-1] if reverse else records).to_csv(out / "metadata.csv",
                                                                   index=False)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """30 light and 10 dark real colored digits, as an imagefolder and in each sharded
    format."""
    root = tmp_path_factory.mktemp("sharded-data")
    toolkit.write_colored_digits(root / "source", "test")
    metadata = toolkit.read_metadata(root / "source")
    chosen = pandas.concat([metadata[metadata["group"] == "light"].head(30),
                            metadata[metadata["group"] == "dark"].head(10)])  # fmt: skip
    folders = {"imagefolder": copy_subset(root / "source", chosen.reset_index(drop=True),
                                          root / "imagefolder")}  # fmt: skip
    for fmt in SHARDED:
        folders[fmt] = shard_copy(folders["imagefolder"], root / fmt, fmt)
    return folders


@pytest.mark.parametrize("fmt", SHARDED)
def test_a_sharded_folder_loads_as_its_imagefolder(digits, tmp_path, fmt):
    plain = toolkit.load_image_folder(digits["imagefolder"], ["digit", "group"])
    folder = shard_copy(digits["imagefolder"], tmp_path / fmt, fmt, reverse=True)
    sharded = toolkit.load_image_folder(folder, ["digit", "group"])
    assert len(list(folder.glob("train-*"))) == 6  # 40 images, 7 per shard
    # rows in metadata.csv's order, which is not the shards'
    order = [plain.metadata["file_name"].tolist().index(f) for f in sharded.metadata["file_name"]]
    assert order == list(range(39, -1, -1))
    assert bool((sharded.images == plain.images[order]).all())
    assert sharded.metadata["group"].tolist() == plain.metadata["group"][order].tolist()
    # a few rows (a gallery's) read just those samples, as bytes equal to the files'
    rows = sharded.metadata.iloc[[3, 17, 30]]
    for source, name in zip(toolkit.image_sources(folder, rows), rows["file_name"]):
        assert isinstance(source, toolkit.ShardedImage)
        with toolkit.open_image(source) as image, Image.open(digits["imagefolder"] / name) as file:
            assert np.array_equal(np.asarray(image), np.asarray(file))
    loaded = datasets.load_dataset(fmt, data_dir=str(folder), split="train")
    assert len(loaded) == 40


def test_a_sample_missing_from_its_shard_is_one_line(digits, tmp_path):
    folder = shard_copy(digits["imagefolder"], tmp_path / "broken", "webdataset")
    metadata = pandas.read_csv(folder / "metadata.csv", keep_default_na=False)
    metadata.loc[0, "index"] = 999
    metadata.to_csv(folder / "metadata.csv", index=False)
    result = dtk("eval", "bias", "--images", folder, "--out", tmp_path / "audit", "-q")
    assert result.exit_code == 2, result.output
    shard = metadata.loc[0, "shard"]
    assert f"{folder / shard} holds no image of sample 999" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "audit").exists()


def test_write_shards_leaves_exactly_its_samples(tmp_path):
    def samples(count):
        return (({"index": i, "file_name": f"{i}.png"}, f"png {i}".encode()) for i in range(count))

    first = shards.write_shards(tmp_path, "webdataset", samples(5), shard_size=2)
    assert [r["shard"] for r in first] == [shards.shard_name("webdataset", "main", n)
                                           for n in (0, 0, 1, 1, 2)]  # fmt: skip
    again = shards.write_shards(tmp_path, "webdataset", samples(3), shard_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({r["shard"] for r in again})
    assert raw_images(tmp_path) == {i: f"png {i}".encode() for i in range(3)}
    assert all(r["sha256"] == hashlib.sha256(f"png {r['index']}".encode()).hexdigest()
               for r in again)  # fmt: skip


def test_an_audit_of_a_sharded_folder_with_its_label_sheet_and_human_labels(digits, tmp_path):
    audits = {}
    for fmt in ("imagefolder", "webdataset"):
        out = tmp_path / fmt
        result = dtk("eval", "bias", "--images", digits[fmt], "--bootstrap", 100, "--out",
                     out, "-q")  # fmt: skip
        assert result.exit_code == 0, result.output
        audits[fmt] = out
    shares = {fmt: json.loads((out / "results.json").read_text())["attributes"]["group"]
              for fmt, out in audits.items()}  # fmt: skip
    assert shares["webdataset"]["groups"] == shares["imagefolder"]["groups"]
    # the galleries show the same images, read out of the shards
    galleries = {fmt: sorted(p.read_bytes() for p in (out / "figures").glob("gallery-*"))
                 for fmt, out in audits.items()}  # fmt: skip
    assert galleries["webdataset"] and galleries["webdataset"] == galleries["imagefolder"]
    assert "unreadable image" not in (audits["webdataset"] / "report.md").read_text()

    sheet = tmp_path / "sheet"
    result = dtk("eval", "label-sheet", audits["webdataset"], "--n", 6, "--out", sheet)
    assert result.exit_code == 0, result.output
    page = (sheet / "label-sheet.html").read_text()
    assert len(re.findall(r"<figure[^>]*data-file", page)) == 6
    truth = toolkit.read_metadata(digits["imagefolder"]).set_index("file_name")["group"]
    blank = pandas.read_csv(sheet / "label-sheet.csv", dtype=str, keep_default_na=False)
    blank["group"] = [truth[f] for f in blank["file_name"]]
    blank.to_csv(tmp_path / "answers.csv", index=False)
    checked = tmp_path / "checked"
    result = dtk("eval", "bias", "--images", digits["webdataset"], "--human-labels",
                 tmp_path / "answers.csv", "--bootstrap", 100, "--out", checked, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    calibration = json.loads((checked / "results.json").read_text())
    calibration = calibration["attributes"]["group"]["calibration"]
    assert calibration["images"] == 6 and calibration["errors"] == 0


@pytest.fixture(scope="module")
def synthesized(digits, tmp_path_factory):
    """`dtk synthesize` on the imagefolder data: the images every format must hold."""
    out = tmp_path_factory.mktemp("synthesized") / "imagefolder"
    result = dtk(*synthesize_args(digits["imagefolder"], out))
    assert result.exit_code == 0, result.output
    return out


def synthesize_args(data, out, *more):
    return ["synthesize", "--data", data, "--budget", 8, "--steps", 12, "--max-rounds", 2,
            "--consistency-threshold", 0.5, "--judge", "none", "--out", out, "-q",
            *more]  # fmt: skip


@pytest.mark.parametrize("fmt", SHARDED)
def test_synthesize_format_holds_the_imagefolder_images(digits, synthesized, tmp_path, fmt):
    """Rounds and synthetic folder in shards; the real data sharded too for parquet (the
    memorization filter and combined.csv read it)."""
    data = digits[fmt] if fmt == "parquet" else digits["imagefolder"]
    out = tmp_path / "synth"
    args = synthesize_args(data, out, "--format", fmt, "--shard-size", 4)
    result = dtk(*args)
    assert result.exit_code == 0, result.output
    plain = pandas.read_csv(synthesized / "synthetic" / "metadata.csv", keep_default_na=False)
    ours = pandas.read_csv(out / "synthetic" / "metadata.csv", keep_default_na=False)
    same = ["file_name", "digit", "group", "seed", "round", "sha256"]
    assert len(plain) >= 4 and ours[same].equals(plain[same])
    assert ours["index"].tolist() == list(range(len(ours)))
    # every image once, in its shard, the bytes of the imagefolder run's file
    found = raw_images(out / "synthetic")
    assert sorted(found) == ours["index"].tolist()
    for row in ours.itertuples():
        assert found[row.index] == (synthesized / "synthetic" / row.file_name).read_bytes()
        assert hashlib.sha256(found[row.index]).hexdigest() == row.sha256
    assert not list((out / "synthetic").rglob("*.png"))
    assert not list((out / "rounds").rglob("*.png"))
    loaded = datasets.load_dataset(fmt, data_dir=str(out / "synthetic"), split="train")
    assert len(loaded) == len(ours)
    _check_combined(out, len(ours))
    assert json.loads((out / "results.json").read_text())["config"]["format"] == fmt

    # a rerun resumes the rounds and writes the same synthetic shards
    before = {p: p.read_bytes() for p in (out / "synthetic").glob("train-*")}
    stamps = {p: p.stat().st_mtime_ns for p in (out / "rounds").rglob("train-*")}
    again = dtk(*args)
    assert again.exit_code == 0, again.output
    assert {p: p.read_bytes() for p in (out / "synthetic").glob("train-*")} == before
    assert {p: p.stat().st_mtime_ns for p in (out / "rounds").rglob("train-*")} == stamps


def _check_combined(out, synthetic_rows):
    """combined.csv: every row's image where it says, a sharded row by its shard and
    index."""
    combined = pandas.read_csv(out / "combined.csv", keep_default_na=False)
    assert (combined["synthetic"] == True).sum() == synthetic_rows  # noqa: E712
    for row in combined.itertuples():
        if row.shard:
            assert int(row.index) in raw_shard_images([out / row.shard])
        else:
            assert (out / row.file_name).is_file()


def test_a_classifier_trained_on_a_sharded_folder_is_the_imagefolder_one(digits, tmp_path):
    """`dtk train-classifier` reads the shards: the same images in the same order give the
    same weights, byte for byte."""
    weights = {}
    with torch_threads(1):
        for fmt in ("imagefolder", "parquet"):
            out = tmp_path / fmt
            result = dtk("train-classifier", digits[fmt], "--attribute", "group",
                         "--epochs", 1, "--out", out)  # fmt: skip
            assert result.exit_code == 0, result.output
            weights[fmt] = (out / "model.safetensors").read_bytes()
    assert weights["parquet"] == weights["imagefolder"]
