"""Sharded output formats (`toolkit.data.shards`): WebDataset tars and Parquet files that
`datasets` loads untouched, byte-identical images, resume, sharding, kills and mistakes."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import signal
import subprocess
import time

import datasets
import numpy as np
import pandas
import pytest
from folders import raw_shard_images
from invoke import dtk
from PIL import Image
from tiny_models import save_pipeline

from toolkit.data import shards
from toolkit.data.output import OutputFolder

DTK = shutil.which("dtk")
SHARDED = ("webdataset", "parquet")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_pipeline(tmp_path_factory.mktemp("models") / "cond", conditional=True)


def generate(model, out, *args):
    result = dtk("generate", "--model", model, "--condition", "digit=1", "--steps", 3,
                 "--batch-size", 4, "--out", out, "-q", *args)  # fmt: skip
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """The same 22 samples as an imagefolder: the PNG bytes every format must hold."""
    out = tmp_path_factory.mktemp("formats") / "imagefolder"
    generate(model, out, "-n", 22)
    metadata = pandas.read_csv(out / "metadata.csv")
    return {int(r.index): (out / r.file_name).read_bytes() for r in metadata.itertuples()}


def shard_images(out):
    """index -> PNG bytes of every shard in `out`, read without dtk's code."""
    return raw_shard_images(sorted(out.glob("train-*")))


@pytest.mark.parametrize("fmt", SHARDED)
def test_shards_hold_the_imagefolder_bytes_and_datasets_loads_them(model, reference, tmp_path,
                                                                   fmt):  # fmt: skip
    out = tmp_path / fmt
    generate(model, out, "-n", 22, "--format", fmt, "--shard-size", 8, "--grid",
             tmp_path / "grid.png")  # fmt: skip
    names = sorted(p.name for p in out.glob("train-*"))
    suffix = shards.EXTENSIONS[fmt]
    assert names == [f"train-shard-0000-of-0001-{k:06d}{suffix}" for k in range(3)]
    assert shard_images(out) == reference  # byte for byte, every sample once
    metadata = pandas.read_csv(out / "metadata.csv")
    assert list(metadata["index"]) == list(range(22))
    assert set(metadata["shard"]) == set(names)
    for row in metadata.itertuples():
        assert hashlib.sha256(reference[row.index]).hexdigest() == row.sha256
    assert json.loads((out / "run.json").read_text())["format"] == fmt
    assert not list(out.rglob("*.png")) and not list(out.glob(".*.tmp"))
    # datasets' own loader, untouched, on the folder (metadata.csv and run.json beside)
    loaded = datasets.load_dataset(fmt, data_dir=str(out), split="train")
    assert len(loaded) == 22
    row = loaded[5]
    if fmt == "webdataset":
        assert row["json"]["index"] == int(row["__key__"]) and row["json"]["digit"] == "1"
        image = row["png"]
    else:
        assert row["digit"] == "1" and isinstance(row["seed"], int)
        image = row["image"]
    np.testing.assert_array_equal(
        np.asarray(image), np.asarray(Image.open(io.BytesIO(reference[row_index(row)])))
    )
    assert Image.open(tmp_path / "grid.png").size[0] > 16  # the grid reads the shards


def row_index(row):
    return row["json"]["index"] if "json" in row else row["index"]


@pytest.mark.parametrize("fmt", SHARDED)
def test_a_larger_n_and_shards_k_of_n_extend_without_duplicates(model, reference, tmp_path,
                                                                 fmt):  # fmt: skip
    out = tmp_path / fmt
    generate(model, out, "-n", 10, "--format", fmt, "--shard-size", 8)
    first = {p.name: p.read_bytes() for p in out.glob("train-*")}
    generate(model, out, "-n", 22, "--format", fmt, "--shard-size", 8)
    assert all((out / name).read_bytes() == data for name, data in first.items())  # kept
    assert shard_images(out) == reference
    # the same run split over --shard 0/2 and 1/2, each part its own shards
    split = tmp_path / f"{fmt}-split"
    for k in (0, 1):
        generate(model, split, "-n", 22, "--format", fmt, "--shard-size", 8, "--shard", f"{k}/2")
    assert shard_images(split) == reference
    parts = {p.name.rsplit("-", 1)[0] for p in split.glob("train-*")}
    assert parts == {"train-shard-0000-of-0002", "train-shard-0001-of-0002"}
    assert len(datasets.load_dataset(fmt, data_dir=str(split), split="train")) == 22


def test_a_record_whose_shard_never_appeared_is_not_done_and_its_name_is_never_reused(
    model, reference, tmp_path
):
    """A run killed after logging a shard's records and before renaming it: the samples
    are redone, into a shard of a new number (an old record must not point at it)."""
    out = tmp_path / "out"
    generate(model, out, "-n", 8, "--format", "webdataset", "--shard-size", 8)
    log = out / ".dtk" / "parts" / "shard-0000-of-0001.jsonl"
    lost = json.loads(log.read_text().splitlines()[0])
    ghost = shards.shard_name("webdataset", "shard-0000-of-0001", 4)
    with open(log, "a", encoding="utf-8") as handle:
        for index in (8, 9):
            handle.write(json.dumps({**lost, "index": index, "shard": ghost}) + "\n")
    (out / f".{ghost}.abc.tmp").write_bytes(b"half a tar")
    assert 8 not in OutputFolder(out).done()
    generate(model, out, "-n", 12, "--format", "webdataset", "--shard-size", 8)
    names = sorted(p.name for p in out.glob("train-*"))
    assert names == [shards.shard_name("webdataset", "shard-0000-of-0001", k) for k in (0, 5)]
    assert shard_images(out) == {i: reference[i] for i in range(12)}
    assert list(pandas.read_csv(out / "metadata.csv")["index"]) == list(range(12))
    assert not list(out.glob(".*.tmp"))


@pytest.mark.skipif(DTK is None, reason="the dtk console script is installed with the package")
def test_a_killed_sharded_run_resumes_to_exactly_n_samples(model, tmp_path):
    out = tmp_path / "out"
    args = [DTK, "generate", "--model", str(model), "--condition", "digit=0", "-n", "24",
            "--batch-size", "2", "--steps", "60", "--sampler", "euler", "--format",
            "webdataset", "--shard-size", "4", "--out", str(out), "-q"]  # fmt: skip
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if len(list(out.glob("train-*.tar"))) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert 2 <= len(list(out.glob("train-*.tar"))) < 6
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    found = shard_images(out)  # asserts no sample twice
    assert sorted(found) == list(range(24))
    metadata = pandas.read_csv(out / "metadata.csv")
    assert list(metadata["index"]) == list(range(24))
    for row in metadata.itertuples():
        assert hashlib.sha256(found[row.index]).hexdigest() == row.sha256
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize(("args", "message"), [
    (["--shard-size", "8"], "--shard-size is for --format webdataset and parquet"),
    (["--format", "webdataset", "--shard-size", "0"], "--shard-size must be a whole number >= 1"),
    (["--format", "zip"], "'zip' is not one of"),
    (["--engine", "ray", "--shard", "0/2"], "--engine ray spreads the samples itself"),
    (["--engine", "ray", "--workers", "0"], "--workers must be at least 1"),
    (["--workers", "2"], "--workers and --ray-address are for --engine ray"),
    (["--threads", "0"], "--threads must be a whole number >= 1"),
    (["--engine", "ray", "--ray-address", "127.0.0.1:1"],
     "--ray-address 127.0.0.1:1: no Ray cluster answers there"),
])  # fmt: skip
def test_format_and_engine_mistakes_are_one_line_and_write_nothing(model, tmp_path, args,
                                                                   message):  # fmt: skip
    out = tmp_path / "out"
    result = dtk("generate", "--model", model, "-n", 2, "--out", out, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_a_folder_keeps_its_format(model, tmp_path):
    out = tmp_path / "out"
    generate(model, out, "-n", 2, "--format", "parquet")
    result = dtk("generate", "--model", model, "--condition", "digit=1", "--steps", 3, "-n", 4,
                 "--out", out, "--format", "webdataset")  # fmt: skip
    assert result.exit_code == 2 and "format" in result.output
    # the shard size is not part of the run: a resume may change it
    generate(model, out, "-n", 4, "--format", "parquet", "--shard-size", 1)
    assert len(list(out.glob("train-*.parquet"))) == 3
