"""``--engine ray``: a local Ray instance with 2 CPU workers writes the local engine's bytes
per sample, in every format; a worker killed mid-run costs its chunk, and a rerun ends with
exactly n samples."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tarfile
import time

import pandas
import pytest
from invoke import dtk
from threads import torch_threads
from tiny_models import save_pipeline

import toolkit
from toolkit.errors import DtkError
from toolkit.generation import engines

DTK = shutil.which("dtk")
COMMON = ["--condition", "digit=1", "--steps", "3", "--batch-size", "4", "-n", "24"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_pipeline(tmp_path_factory.mktemp("models") / "cond", conditional=True)


def png_members(shards):
    """The PNG members of tar shards, as many times as they occur."""
    names = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            names += [m.name for m in tar.getmembers() if m.name.endswith(".png")]
    return names


def ray_processes():
    """The pids of Ray's processes (``ray::...``) alive now."""
    found = set()
    for entry in pathlib.Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":  # a zombie holds nothing
                    found.add(int(entry.name))
    return found


def left_behind(before, wait=10.0):
    """Ray processes a run started that are still alive `wait` seconds after it ended."""
    deadline = time.monotonic() + wait
    while (extra := ray_processes() - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    return extra


def ray_run(model, out, *args, timeout=300):
    """The real executable: Ray's processes start and end with it."""
    return subprocess.run([DTK, "generate", "--model", str(model), *COMMON, "--engine", "ray",
                           "--workers", "2", "--out", str(out), "-q", *args],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def local(model, tmp_path_factory):
    """The local engine's run, at one thread (``--threads 1``) as each Ray worker has by
    default (on a CPU the sums of a convolution depend on how many threads split them)."""
    out = tmp_path_factory.mktemp("local") / "out"
    result = dtk("generate", "--model", model, *COMMON, "--threads", 1, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    return pandas.read_csv(out / "metadata.csv").set_index("index")["sha256"]


@pytest.mark.parametrize("fmt", ["imagefolder", "webdataset"])
def test_two_workers_write_the_local_engines_bytes(model, local, tmp_path, fmt):
    out = tmp_path / fmt
    extra = [] if fmt == "imagefolder" else ["--format", fmt, "--shard-size", "8"]
    before = ray_processes()
    result = ray_run(model, out, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not left_behind(before), "the run left Ray's processes running"
    assert result.stderr.strip() == "24 images in " + str(out)  # Ray's own chatter kept out
    metadata = pandas.read_csv(out / "metadata.csv").set_index("index")
    assert list(metadata.index) == list(range(24))
    pandas.testing.assert_series_equal(metadata["sha256"], local)
    parts = sorted(p.name for p in (out / ".dtk" / "parts").iterdir())
    # each actor its own part log (one may have taken every chunk)
    assert 1 <= len(parts) <= 2 and all(p.startswith("ray-") for p in parts)
    run = json.loads((out / "run.json").read_text())
    assert len(run["sigmas"]) == 4
    if fmt == "webdataset":
        shards = sorted(out.glob("train-ray-*.tar"))
        assert len(shards) == 3  # a chunk of 8 each
        assert sorted(png_members(shards)) == [f"{i:09d}.png" for i in range(24)]
    # a rerun finds everything done: nothing is generated, nothing changes
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()
              and ".dtk" not in p.parts and p.name not in ("metadata.csv", "rejected.csv",
                                                           "run.json")}  # fmt: skip
    again = ray_run(model, out, *extra)
    assert again.returncode == 0, again.stderr[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.name in before}
    assert after == before


def test_a_killed_worker_costs_its_chunk_and_a_rerun_ends_with_exactly_n(model, tmp_path):
    slow = [*COMMON, "--steps", "60", "--format", "webdataset", "--shard-size", "4"]
    reference = tmp_path / "local"
    result = dtk("generate", "--model", model, *slow, "--threads", 1, "--out", reference, "-q")
    assert result.exit_code == 0, result.output
    local = pandas.read_csv(reference / "metadata.csv").set_index("index")["sha256"]

    out = tmp_path / "out"
    args = [DTK, "generate", "--model", str(model), *slow, "--engine", "ray", "--workers", "2",
            "--out", str(out), "-q"]  # fmt: skip
    driver = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    parts = out / ".dtk" / "parts"
    deadline, killed = time.monotonic() + 240, None
    while time.monotonic() < deadline and driver.poll() is None and killed is None:
        for log in parts.glob("ray-*.jsonl") if parts.is_dir() else []:
            if log.read_text().count("\n") >= 1:  # this worker logged a chunk: kill it
                killed = int(log.stem.rsplit("-", 1)[1])
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.02)
    assert killed is not None, "no worker logged a chunk before the run ended"
    driver.communicate(timeout=300)  # Ray restarts the actor, or the run fails: either way
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    metadata = pandas.read_csv(out / "metadata.csv").set_index("index")
    pandas.testing.assert_series_equal(metadata["sha256"], local)
    keys = png_members(out.glob("train-*.tar"))
    assert sorted(keys) == [f"{i:09d}.png" for i in range(24)]  # each sample once
    assert not list(out.glob(".*.tmp"))


def test_without_ray_the_engine_says_how_to_get_it(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("no ray here")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(DtkError, match=r"pip install 'diffusion-toolkit\[ray\]'"):
        engines.import_ray()


def test_synthesize_rounds_on_ray_accept_the_local_images(tmp_path):
    """`dtk synthesize --engine ray`: every round on the actor pool; the same accepted
    images, byte for byte, as the local engine at one thread."""
    from folders import copy_subset

    import toolkit

    full = tmp_path / "full"
    toolkit.write_colored_digits(full, "train", minority_share=0.05)
    metadata = toolkit.read_metadata(full)
    keep = pandas.concat(
        metadata[(metadata.digit == "0") & (metadata.group == g)].head(n)
        for g, n in (("light", 8), ("dark", 2))
    )  # fmt: skip
    data = copy_subset(full, keep, tmp_path / "small")
    common = ["synthesize", "--data", str(data), "--steps", "6", "--judge", "none", "-q"]
    result = dtk(*common, "--threads", 1, "--out", tmp_path / "local")
    assert result.exit_code == 0, result.output
    ray = subprocess.run([DTK, *common, "--engine", "ray", "--workers", "2", "--out",
                          str(tmp_path / "ray")], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert ray.returncode == 0, ray.stderr[-3000:]
    ours, theirs = (pandas.read_csv(tmp_path / name / "synthetic" / "metadata.csv")
                    for name in ("ray", "local"))  # fmt: skip
    assert len(ours) == len(theirs) == 6
    assert list(ours["sha256"]) == list(theirs["sha256"])


def test_threads_hold_for_the_local_run_and_are_given_back(model, tmp_path, monkeypatch):
    """``threads``: torch's threads while the local engine runs, the caller's after."""
    import torch

    from toolkit.generation import generate as generation

    seen, real_run = [], generation.run

    def run(plan):
        seen.append(torch.get_num_threads())
        return real_run(plan)

    monkeypatch.setattr(generation, "run", run)
    with torch_threads(3):
        toolkit.generate(model, out=tmp_path / "out", conditions={"digit": "1"}, n=2,
                         steps=2, threads=1, progress=False)  # fmt: skip
        toolkit.generate(model, out=tmp_path / "more", conditions={"digit": "1"}, n=2,
                         steps=2, progress=False)  # fmt: skip
        assert seen == [1, 3] and torch.get_num_threads() == 3


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_run_joins_a_running_cluster_at_its_address(model, local, tmp_path):
    """How ``ray job submit`` and KubeRay run it: the driver joins a cluster that is already
    up (``--ray-address``) instead of starting one; the same bytes. The cluster's workers
    start in the head's directory, not the driver's: a relative path the run was given (a
    filter's data folder here) still means what it meant to the driver."""
    ray_cli = shutil.which("ray")
    assert ray_cli is not None, "ray[data] installs the ray command"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # a local test cluster, no token
    data = dtk("generate", "--model", model, "-n", 2, "--steps", 1, "--out",
               tmp_path / "data", "-q")  # fmt: skip
    assert data.exit_code == 0, data.output
    (tmp_path / "head").mkdir()
    port = free_port()
    head = [ray_cli, "start", "--head", "--num-cpus", "3", "--include-dashboard=false",
            "--port", str(port), "--disable-usage-stats"]  # fmt: skip
    subprocess.run(head, capture_output=True, text=True, timeout=120, env=env, check=True,
                   cwd=tmp_path / "head")  # fmt: skip
    try:
        result = subprocess.run([DTK, "generate", "--model", str(model), *COMMON, "--engine",
                                 "ray", "--workers", "2", "--ray-address", f"127.0.0.1:{port}",
                                 "--filter", "memorization", "--filter-option", "data=data",
                                 "--filter-option", "threshold=0", "--format", "webdataset",
                                 "--shard-size", "8", "--out", "out", "-q"],
                                capture_output=True, text=True, timeout=300, env=env,
                                cwd=tmp_path)  # fmt: skip
    finally:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    metadata = pandas.read_csv(tmp_path / "out" / "metadata.csv").set_index("index")
    pandas.testing.assert_series_equal(metadata["sha256"], local)
    assert (metadata["filter_memorization_score"] > 0).all()  # the workers read data/


def test_a_mistake_a_worker_finds_is_one_line(model, tmp_path):
    """A plugin option only a worker can check (the filter's data folder, read when the
    filter is made): the driver says the worker's one line, Ray's retries stay off the
    terminal, and the folder is left as it was."""
    before = ray_processes()
    result = subprocess.run([DTK, "generate", "--model", str(model), *COMMON, "--engine", "ray",
                             "--filter", "memorization", "--filter-option", "data=nothere",
                             "--out", str(tmp_path / "out"), "-q"], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr == "Error: nothere is not a dataset folder: no metadata.csv\n"
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()
    assert not left_behind(before), "the failed run left Ray's processes running"
