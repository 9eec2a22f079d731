"""The output folder's guarantees under hostile input and concurrent runs.

Every path the toolkit writes stays inside ``--out``, whatever the model folder says; one
run at a time writes a folder (or shard), and a crashed one does not block it; a failed run
leaves nothing claimed; merging never replaces good metadata with less.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import pandas
import pytest
from invoke import dtk
from tiny_models import ATTRIBUTES, save_pipeline

import toolkit.generation.run as run_module
from toolkit import DtkError
from toolkit.data.locking import hold, share
from toolkit.data.output import OutputFolder
from toolkit.data.paths import inside, safe_name
from toolkit.generation.generate import generate

QUICK = {"n": 2, "steps": 1, "batch_size": 2, "progress": False}


def files_under(root: pathlib.Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_pipeline(tmp_path_factory.mktemp("models") / "cond", conditional=True)


@pytest.fixture(scope="module")
def dotted_model(tmp_path_factory):
    """A conditional model whose label values are path tricks."""
    path = save_pipeline(tmp_path_factory.mktemp("models") / "dotted", conditional=True)
    attributes = [dict(ATTRIBUTES[0], values=["..", ".", "/etc"]), ATTRIBUTES[1]]
    (path / "toolkit.json").write_text(json.dumps({"format": 1, "attributes": attributes}))
    return path


# -- paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name"),
    [("..", "__"), (".", "_"), ("", "_"), (".hidden", "_hidden"), ("/etc/passwd", "-etc-passwd"),
     ("a/../b", "a-..-b"), ("dark", "dark"), ("x=1", "x=1")],
)  # fmt: skip
def test_safe_name_is_one_visible_component(text, name):
    assert safe_name(text) == name
    assert "/" not in name and not name.startswith(".")


def test_inside_refuses_every_way_out(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    assert inside(root, "a/b.png") == root / "a" / "b.png"
    for bad in ["/000000.png", "../x.png", "a/../../x.png", "", ".", "link/x.png"]:
        with pytest.raises(DtkError, match=r"outside|not a path inside"):
            inside(root, bad)


@pytest.mark.parametrize("value", ["..", ".", "/etc"])
def test_label_values_cannot_lead_out_of_the_folder(dotted_model, tmp_path, value):
    out = tmp_path / "box" / "out"
    generate(dotted_model, out=out, conditions={"digit": value}, **QUICK)
    assert set(os.listdir(tmp_path / "box")) == {"out"}  # nothing beside the folder
    metadata = pandas.read_csv(out / "metadata.csv", keep_default_na=False)
    assert list(metadata["digit"]) == [value, value]  # the metadata keeps the real value
    for name in metadata["file_name"]:
        assert (out / name).resolve().is_relative_to(out.resolve())
        assert not name.startswith(".") and not pathlib.PurePath(name).parts[0].startswith(".")


def test_values_fair_guidance_draws_stay_inside_too(dotted_model, tmp_path):
    out = tmp_path / "box" / "out"
    generate(dotted_model, out=out, guidance="fair", guidance_options={"attribute": "digit"},
             conditions={"group": "dark"}, **dict(QUICK, n=6))  # fmt: skip
    assert set(os.listdir(tmp_path / "box")) == {"out"}
    metadata = pandas.read_csv(out / "metadata.csv", keep_default_na=False)
    assert set(metadata["digit"]) == {"..", ".", "/etc"}
    folders = {pathlib.PurePath(name).parts[0] for name in metadata["file_name"]}
    assert folders == {"___dark", "__dark", "-etc_dark"}


def test_an_empty_or_repeated_label_value_is_refused(tmp_path):
    path = save_pipeline(tmp_path / "empty", conditional=True)
    for values, message in [(["0", ""], "include an empty one"), (["0", "0"], "name '0' twice")]:
        attributes = [dict(ATTRIBUTES[0], values=values), ATTRIBUTES[1]]
        (path / "toolkit.json").write_text(json.dumps({"format": 1, "attributes": attributes}))
        result = dtk("generate", "--model", path, "-n", 1, "--out", tmp_path / "out")
        assert result.exit_code == 2
        assert message in result.stderr and len(result.stderr.splitlines()) == 1
        assert not (tmp_path / "out").exists()


def test_a_part_log_cannot_point_outside(tmp_path):
    folder = OutputFolder(tmp_path / "out")
    (folder.root / ".dtk" / "parts").mkdir(parents=True)
    record = {"index": 0, "status": "ok", "file_name": "../../evil.png"}
    folder.part_file("p").write_text(json.dumps(record) + "\n")
    with pytest.raises(DtkError, match="not a path inside"):
        folder.done()


# -- one run at a time ---------------------------------------------------------------------


def test_a_second_run_of_the_same_part_is_refused(model, tmp_path):
    out = tmp_path / "out"
    with hold(out / ".dtk" / "locks" / "shard-0000-of-0001.lock", "held"):
        with pytest.raises(DtkError, match=r"in use by another dtk run \(pid \d+ on .*--wait"):
            generate(model, out=out, **QUICK)
        assert not (out / "run.json").exists()
    result = dtk("generate", "--model", model, "-n", 1, "--steps", 1, "--out", out, "-q")
    assert result.exit_code == 0, result.output


def test_wait_starts_when_the_holder_finishes(model, tmp_path):
    out = tmp_path / "out"
    lock = out / ".dtk" / "locks" / "shard-0000-of-0001.lock"
    taken, release = threading.Event(), threading.Event()

    def holder() -> None:
        with hold(lock, "held"):
            taken.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    taken.wait(10)
    threading.Timer(0.5, release.set).start()
    started = time.monotonic()
    generate(model, out=out, wait=True, **QUICK)
    thread.join()
    assert time.monotonic() - started >= 0.4
    assert len(pandas.read_csv(out / "metadata.csv")) == 2


def test_runs_that_divide_the_samples_otherwise_never_write_at_once(model, tmp_path):
    """A Ray run (its driver's split lock), a one-process run and --shard K/N runs would
    write the same indices: each is refused while another kind writes; parts of one
    division run side by side."""
    out = tmp_path / "out"
    locks = out / ".dtk" / "locks"
    with OutputFolder(out).hold("ray-driver", split="ray"):
        for extra in ([], ["--shard", "1/2"]):
            result = dtk("generate", "--model", model, "-n", 4, "--steps", 1, "--out", out,
                         "-q", *extra)  # fmt: skip
            assert result.exit_code == 2, result.output
            assert "is being written by a Ray engine run, which divides the samples " \
                "differently from this" in result.stderr  # fmt: skip
        assert not (out / "run.json").exists() and not (out / ".dtk" / "parts").exists()
    with share(locks / "split-2.lock"), hold(locks / "shard-0000-of-0002.lock", "held"):
        result = dtk("generate", "--model", model, "-n", 4, "--steps", 1, "--out", out, "-q")
        assert result.exit_code == 2 and "a run in 2 shards (--shard K/2" in result.stderr
        result = dtk("generate", "--model", model, "-n", 4, "--steps", 1, "--out", out, "-q",
                     "--shard", "1/2")  # fmt: skip
        assert result.exit_code == 0, result.output  # the other part of the same division
    result = dtk("generate", "--model", model, "-n", 4, "--steps", 1, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert len(pandas.read_csv(out / "metadata.csv")) == 4


@pytest.mark.skipif(shutil.which("dtk") is None, reason="the dtk console script is installed")
def test_two_kinds_of_run_waiting_on_each_other_both_finish(model, tmp_path):
    """--wait on both sides: a one-process run and a --shard 0/2 run started together on
    one folder take turns (neither holds its split while it waits), and every sample is
    written once."""
    out = tmp_path / "out"
    common = [shutil.which("dtk"), "generate", "--model", str(model), "-n", "8", "--steps", "20",
              "--out", str(out), "--wait", "-q"]  # fmt: skip
    runs = [subprocess.Popen(common + extra, stderr=subprocess.PIPE, text=True)
            for extra in ([], ["--shard", "0/2"])]  # fmt: skip
    said = []
    for run in runs:
        _, stderr = run.communicate(timeout=240)
        assert run.returncode == 0, stderr
        said.append(stderr)
    assert any("dtk: waiting, " in text and "divides the samples differently" in text
               for text in said), said  # fmt: skip
    metadata = pandas.read_csv(out / "metadata.csv")
    assert sorted(metadata["index"]) == list(range(8))


def test_two_kinds_that_look_at_the_same_moment_take_turns(tmp_path, monkeypatch):
    """The worst timing: a one-process run and a Ray run each share their split lock before
    either looks at the other's. Both wait (--wait); neither may wait for ever."""
    from toolkit.data import locking

    folder, both_hold = OutputFolder(tmp_path / "out"), threading.Barrier(2)
    real_in_use, looked = locking.in_use, threading.local()

    def in_use(path):
        if not getattr(looked, "once", False):  # each run's first look: after both hold
            looked.once = True
            both_hold.wait(10)
        return real_in_use(path)

    monkeypatch.setattr(locking, "in_use", in_use)
    (tmp_path / "out" / ".dtk" / "locks").mkdir(parents=True)
    for split in ("1", "ray"):  # each kind's lock file exists, as after earlier runs
        (tmp_path / "out" / ".dtk" / "locks" / f"split-{split}.lock").touch()
    done = []

    def run(part, split):
        with folder.hold(part, split=split, wait=True):
            done.append(split)
            time.sleep(0.2)

    threads = [threading.Thread(target=run, args=args, daemon=True)
               for args in (("shard-0000-of-0001", "1"), ("ray-driver", "ray"))]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(done) == ["1", "ray"], "the two runs waited on each other"


def test_a_killed_holder_does_not_block_the_folder(model, tmp_path):
    out = tmp_path / "out"
    lock = out / ".dtk" / "locks" / "shard-0000-of-0001.lock"
    script = (
        "import os, pathlib, signal, sys\n"
        "from toolkit.data.locking import hold\n"
        "with hold(pathlib.Path(sys.argv[1]), 'x'):\n"
        "    print('held', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    process = subprocess.run([sys.executable, "-c", script, str(lock)], capture_output=True)
    assert process.returncode == -signal.SIGKILL and process.stdout == b"held\n"
    generate(model, out=out, **QUICK)
    assert len(pandas.read_csv(out / "metadata.csv")) == 2


def test_claiming_is_atomic(tmp_path, monkeypatch):
    """Two runs claiming one folder at once, on a filesystem slow enough to interleave a
    read and a write of run.json: exactly one may have it."""
    read_run = OutputFolder.read_run

    def slow_read(self):
        run = read_run(self)
        time.sleep(0.3)
        return run

    monkeypatch.setattr(OutputFolder, "read_run", slow_read)
    outcomes: list[str] = []

    def claim(seed: int) -> None:
        try:
            OutputFolder(tmp_path / "out").claim({"seed": seed, "n": 1}, ("seed",))
            outcomes.append("claimed")
        except DtkError as exc:
            outcomes.append(str(exc))

    (tmp_path / "out").mkdir()
    threads = [threading.Thread(target=claim, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("claimed") == 1
    assert any("holds a different run (differing in seed)" in o for o in outcomes)


# -- a failed run leaves nothing claimed ---------------------------------------------------


def test_a_seed_too_large_is_refused_before_the_folder_is_touched(model, tmp_path):
    out = tmp_path / "out"
    result = dtk("generate", "--model", model, "-n", 2, "--seed", 2**64 - 1, "--out", out)
    assert result.exit_code == 2
    assert "seed 18446744073709551615 is too large" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not out.exists()
    result = dtk("generate", "--model", model, "-n", 2, "--seed", 2**64 - 2, "--steps", 1,
                 "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output


def test_a_run_failing_after_its_claim_unclaims_the_folder(model, tmp_path, monkeypatch):
    out = tmp_path / "new" / "out"

    def broken(*args, **kwargs):
        raise DtkError("the sampler broke")

    monkeypatch.setattr(run_module, "sample_images", broken)
    with pytest.raises(DtkError, match="the sampler broke"):
        generate(model, out=out, **QUICK)
    assert not (tmp_path / "new").exists()  # created for the run, removed with it
    monkeypatch.undo()
    generate(model, out=out, seed=3, **QUICK)  # another run may use the folder now
    assert json.loads((out / "run.json").read_text())["seed"] == 3


def test_a_failed_resume_keeps_the_folder_and_its_samples(model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    generate(model, out=out, **QUICK)
    before = files_under(out)

    def broken(*args, **kwargs):
        raise DtkError("the sampler broke")

    monkeypatch.setattr(run_module, "sample_images", broken)
    with pytest.raises(DtkError):
        generate(model, out=out, **dict(QUICK, n=4))
    assert {f for f in before if ".dtk/locks" not in f} <= files_under(out)
    assert len(pandas.read_csv(out / "metadata.csv")) == 2


def test_grid_is_checked_before_any_compute(model, tmp_path):
    (tmp_path / "grid.png").mkdir()
    for grid, message in [(tmp_path / "grid.png", "is a folder"), (tmp_path / "g.jpg", "PNG")]:
        result = dtk("generate", "--model", model, "-n", 1, "--out", tmp_path / "out",
                     "--grid", grid)  # fmt: skip
        assert result.exit_code == 2
        assert message in result.stderr and len(result.stderr.splitlines()) == 1
        assert not (tmp_path / "out").exists()


# -- merging -------------------------------------------------------------------------------


@pytest.fixture
def finished(model, tmp_path):
    out = tmp_path / "out"
    generate(model, out=out, **dict(QUICK, n=3))
    return out


def test_merge_never_replaces_metadata_with_less(finished):
    before = (finished / "metadata.csv").read_bytes()
    for path in sorted((finished / ".dtk").rglob("*"), reverse=True):  # copied without it
        path.unlink() if path.is_file() else path.rmdir()
    result = dtk("merge", finished)
    assert result.exit_code == 2
    assert "lists 3 sample(s) that no part log" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert (finished / "metadata.csv").read_bytes() == before


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"status": "ok", "file_name": "a.png"}', "'index' must be a whole number"),
        ('{"index": "seven", "status": "ok", "file_name": "a.png"}', "got 'seven'"),
        ('{"index": 7, "file_name": "a.png"}', "'status' missing"),
        ("[1, 2]", "not a JSON object"),
        ("{not json", "Expecting property name"),
    ],
)
def test_a_damaged_part_log_is_named_with_its_line(finished, line, problem):
    [part] = (finished / ".dtk" / "parts").glob("*.jsonl")
    lines = part.read_text().splitlines()
    part.write_text("\n".join([lines[0], line, *lines[1:]]) + "\n")
    before = (finished / "metadata.csv").read_bytes()
    result = dtk("merge", finished)
    assert result.exit_code == 2
    assert f"{part}:2: damaged part log" in result.stderr and problem in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert (finished / "metadata.csv").read_bytes() == before


def test_a_run_json_that_is_not_a_record_is_refused(finished):
    (finished / "run.json").write_text("[1, 2, 3]")
    result = dtk("merge", finished)
    assert result.exit_code == 2
    assert "is not a dtk run record (a JSON object), but a list" in result.stderr


def test_a_torn_last_record_is_redone_and_the_log_stays_readable(model, finished):
    [part] = (finished / ".dtk" / "parts").glob("*.jsonl")
    lines = part.read_text().splitlines()
    part.write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])  # killed mid-write
    assert OutputFolder(finished).done() == {0, 1}
    generate(model, out=finished, **dict(QUICK, n=3))
    assert part.read_text().endswith("\n")
    assert sorted(OutputFolder(finished).records()) == [0, 1, 2]
    assert len(pandas.read_csv(finished / "metadata.csv")) == 3


def test_merge_help_is_plain_text_with_an_example():
    result = dtk("merge", "--help")
    assert result.exit_code == 0
    assert "``" not in result.stdout
    assert "dtk merge big" in result.stdout
