"""End to end through the real `dtk` executable: kill and resume, torchrun, datasets."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pandas
import pytest
from folders import pixels
from PIL import Image
from tiny_models import save_pipeline

DTK = shutil.which("dtk")
TORCHRUN = shutil.which("torchrun")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_pipeline(tmp_path_factory.mktemp("models") / "cond", conditional=True)


def dtk(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([DTK, *args], capture_output=True, text=True, timeout=300, **kwargs)


def test_a_killed_run_resumes_to_exactly_n_samples(model, tmp_path):
    out = tmp_path / "out"
    args = ["generate", "--model", str(model), "--condition", "digit=0", "-n", "12",
            "--batch-size", "2", "--steps", "150", "--sampler", "euler", "--out", str(out),
            "-q"]  # fmt: skip
    process = subprocess.Popen([DTK, *args], stderr=subprocess.PIPE, text=True)
    parts = out / ".dtk" / "parts"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        logs = list(parts.glob("*.jsonl")) if parts.is_dir() else []
        if logs and logs[0].read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "metadata.csv").exists()
    killed_with = len(list(out.rglob("*.png")))
    assert killed_with < 12

    result = dtk(*args)
    assert result.returncode == 0, result.stderr
    metadata = pandas.read_csv(out / "metadata.csv")
    assert sorted(metadata["index"]) == list(range(12))
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert pngs == sorted(metadata["file_name"])
    assert not list(out.rglob("*.tmp"))
    for row in metadata.itertuples():
        Image.open(out / row.file_name).verify()


@pytest.mark.skipif(
    TORCHRUN is None, reason="torch ships torchrun; its absence is a broken install"
)
def test_torchrun_ranks_split_the_work_and_match_one_process(model, tmp_path):
    common = ["generate", "--model", str(model), "--condition", "group=dark", "-n", "5",
              "--seed", "7", "--sampler", "dpmpp_2m_sde", "--steps", "5", "--batch-size", "2",
              "-q"]  # fmt: skip
    single = tmp_path / "single"
    assert dtk(*common, "--out", str(single)).returncode == 0
    multi = tmp_path / "multi"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc-per-node", "2", DTK, *common, "--out", str(multi)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    parts = sorted(p.name for p in (multi / ".dtk" / "parts").iterdir())
    assert parts == ["shard-0000-of-0002.jsonl", "shard-0001-of-0002.jsonl"]
    ours, reference = pixels(multi), pixels(single)
    assert sorted(ours) == list(range(5))
    for i in range(5):
        assert np.abs(ours[i] - reference[i]).max() <= 1


def test_output_loads_with_datasets_imagefolder(model, tmp_path):
    import datasets  # in the test extra

    out = tmp_path / "out"
    result = dtk("generate", "--model", str(model), "--condition", "digit=1", "-n", "3",
                 "--steps", "3", "--out", str(out), "-q")  # fmt: skip
    assert result.returncode == 0, result.stderr
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    dataset = datasets.load_dataset(
        "imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert dataset.num_rows == 3
    assert sorted(dataset["index"]) == [0, 1, 2]
    assert dataset[0]["image"].size == (8, 8)
    assert set(dataset["digit"]) == {1}


def test_help_through_the_executable_teaches_the_options():
    result = dtk("generate", "--help")
    assert result.returncode == 0
    for option in ("--sampler-option", "--condition", "--shard", "--on-flag", "Examples"):
        assert option in result.stdout
