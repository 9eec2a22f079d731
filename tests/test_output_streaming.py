"""The output path at scale (issue 16): images durable once a batch and always before their
records, the CSVs streamed with exactly pandas' text, merging and resuming in memory that
does not grow with the records.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import pathlib
import sys
import tracemalloc

import numpy as np
import pandas
import pytest

from toolkit import DtkError
from toolkit.data import atomic, csv_rows, output
from toolkit.data.output import IndexSet, OutputFolder


def pandas_csvs(records: list[dict]) -> tuple[str, str]:
    """metadata.csv and rejected.csv as the merge wrote them with pandas before it streamed:
    the latest record of each index, in index order."""

    def frame(rows: list[dict], first: tuple[str, ...]) -> pandas.DataFrame:
        table = pandas.DataFrame.from_records(rows)
        if table.empty:
            return pandas.DataFrame(columns=list(first))
        ordered = [c for c in first if c in table.columns]
        return table[ordered + [c for c in table.columns if c not in ordered]]

    by_index = {r["index"]: r for r in records}
    ordered = [by_index[i] for i in sorted(by_index)]
    written = [r for r in ordered if r["status"] in output.WRITTEN]
    rejected = frame([r for r in ordered if r["status"] not in output.WRITTEN], ("index",))
    if "file_name" in rejected.columns:
        rejected = rejected.drop(columns="file_name")
    return frame(written, ("file_name",)).to_csv(index=False), rejected.to_csv(index=False)


def log(folder: OutputFolder, part: str, records: list[dict], tail: str = "") -> None:
    path = folder.part_file(part)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")


def streamed(records: list[dict], first: tuple[str, ...] = ()) -> str:
    """`records` through `csv_rows`, as the merge writes them."""
    signatures = list(dict.fromkeys(csv_rows.signature(r) for r in records))
    text = io.StringIO(newline="")
    csv_rows.write(text, csv_rows.Columns(signatures, first), records)
    return text.getvalue()


# -- the CSV text --------------------------------------------------------------------------

#: values of each kind a record can hold (JSON's: None, bools, ints, floats, strings, nested)
KINDS = {
    "null": [None, float("nan")],
    "pos": [3, 0, 2**63 - 1],
    "neg": [-5, -(2**63)],
    "uint": [2**63, 2**64 - 1],
    "float": [0.1, 1e16, -0.0, float("inf"), 5e-324, 2.5],
    "big": [2**70, -(2**70)],
    "bool": [True, False],
    "str": ["a,b", "", "nan", 'say "hi"\nthen', "3", "ünï ✓"],
    "nested": [{"scale": [1, 2.5]}, [None, "x"]],
}
ABSENT = object()


def test_the_csv_text_is_pandas_on_every_mix_of_kinds():
    """One column for each mix of kinds (any of the numeric ones and absent keys, with or
    without one other kind): pandas converts some mixes to float, which must show."""
    numeric = ["absent", "null", "pos", "neg", "uint", "float"]
    subsets = [set(m) for r in range(7) for m in itertools.combinations(numeric, r)]
    extras = [set(), {"big"}, {"bool"}, {"str"}, {"nested"}]
    mixes = [mix | extra for mix in subsets for extra in extras if mix | extra]
    rows = 24
    columns = {}
    for j, mix in enumerate(mixes):
        values = [v for kind in sorted(mix) for v in KINDS.get(kind, [ABSENT])]
        columns[f"c{j}"] = list(itertools.islice(itertools.cycle(values), rows))
    records = [{name: values[r] for name, values in columns.items() if values[r] is not ABSENT}
               for r in range(rows)]  # fmt: skip
    assert streamed(records) == pandas.DataFrame.from_records(records).to_csv(index=False)


def test_a_float_column_reads_as_pandas_writes_it():
    floats = [float(np.float64(x)) for x in np.random.default_rng(0).standard_cauchy(2000) * 1e6]
    records = [{"x": v, "y": i if i % 7 else None} for i, v in enumerate(floats)]
    assert streamed(records) == pandas.DataFrame.from_records(records).to_csv(index=False)


def varied_records() -> list[dict]:
    """Records as runs write them, of every status, and a few a hand could leave."""
    records = []
    for i in range(40):
        status = ["ok", "tagged", "blank", "dropped", "refused", "failed"][i % 6]
        record = {"file_name": f"{'7' if i % 2 else '..'}_dark/{i:06d}.png", "index": i,
                  "seed": 2**64 - 1 - i, "digit": str(i % 3), "group": ["dark", "", "light"][i % 3],
                  "model": "/m/shipped", "sampler": "deis", "sampler_options": "{}",
                  "steps": 20, "guidance": "cfg", "guidance_options": '{"scale": 2.0}',
                  "filter_nonfinite_flagged": i % 4 == 0,
                  "filter_nonfinite_score": None if i % 3 else i / 7,
                  "filter_nonfinite_reason": "constant, \"flat\"" if i % 4 == 0 else "",
                  "status": status}  # fmt: skip
        if i % 5 == 0:
            record["prompt"] = "a cat, 'quoted'\nsecond line ✓"
        if i % 9 == 0:
            record["loras"] = [{"path": "x.safetensors", "scale": 0.8}]  # nested, as a hand writes
        if status == "failed":
            record["reason"] = "non-finite values (NaN or inf) in the result"
        if status in output.WRITTEN:
            record["sha256"] = f"{i:064x}"
        records.append(record)
    return records


def test_the_merge_writes_pandas_bytes_and_the_latest_record_wins(tmp_path):
    records = varied_records()
    folder = OutputFolder(tmp_path / "out")
    redone = [dict(r, seed=1, status="ok", sha256="f" * 64) for r in records[3:6]]
    log(folder, "shard-0000-of-0002", records[::2])
    # later parts win over earlier ones, later lines over earlier ones; a torn tail is not read
    log(folder, "shard-0001-of-0002", records[1::2] + redone, tail='{"index": 99, "st')
    merged = folder.merge()
    metadata, rejected = pandas_csvs(records + redone)
    assert (folder.root / "metadata.csv").read_text(encoding="utf-8") == metadata
    assert (folder.root / "rejected.csv").read_text(encoding="utf-8") == rejected
    rows = [len(pandas.read_csv(io.StringIO(text))) for text in (metadata, rejected)]
    assert merged == output.Merged(*rows)
    assert merged.samples == 40
    expected = pandas.DataFrame.from_records(
        [r for r in sorted({r["index"]: r for r in records + redone}.values(),
                           key=lambda r: r["index"]) if r["status"] in output.WRITTEN])  # fmt: skip
    assert folder.metadata().equals(expected)  # the Python API's frame, types kept
    assert folder.merge() == merged  # merging again changes nothing
    assert (folder.root / "metadata.csv").read_text(encoding="utf-8") == metadata


@pytest.mark.parametrize("which", ["no metadata", "no rejected", "nothing"])
def test_empty_csvs_are_pandas_bytes_too(tmp_path, which):
    records = {"no metadata": [r for r in varied_records() if r["status"] == "dropped"],
               "no rejected": [r for r in varied_records() if r["status"] == "ok"],
               "nothing": []}[which]  # fmt: skip
    folder = OutputFolder(tmp_path / "out")
    if records:
        log(folder, "p", records)
    folder.merge()
    metadata, rejected = pandas_csvs(records)
    assert (folder.root / "metadata.csv").read_text() == metadata
    assert (folder.root / "rejected.csv").read_text() == rejected
    assert list(folder.metadata().columns)[:1] == ["file_name"]


def test_a_rejected_sample_missing_from_the_logs_is_refused(tmp_path):
    folder = OutputFolder(tmp_path / "out")
    records = varied_records()
    log(folder, "p", records)
    folder.merge()
    kept = [r for r in records if r["index"] != 4]  # sample 4 was refused
    log(folder, "p", kept)
    before = (folder.root / "rejected.csv").read_bytes()
    with pytest.raises(DtkError, match=r"rejected.csv lists 1 sample\(s\) .* \(e.g. '4'\)"):
        folder.merge()
    assert (folder.root / "rejected.csv").read_bytes() == before


# -- durability ----------------------------------------------------------------------------


def test_a_record_reaches_the_log_only_after_its_image_is_durable(tmp_path, monkeypatch):
    folder = OutputFolder(tmp_path / "out")
    events = []
    make_durable = output.make_durable

    def spy(paths):
        events.append(("durable", sorted(p.name for p in paths), log_text()))
        make_durable(paths)

    def log_text() -> str:
        return folder.part_file("p").read_text()

    monkeypatch.setattr(output, "make_durable", spy)
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    with folder.part_writer("p") as writer:
        for i in range(3):
            writer.write({"file_name": f"c/{i}.png", "index": i, "status": "ok"}, pixels)
        writer.write({"index": 3, "status": "refused"}, None)
        assert (folder.root / "c" / "2.png").is_file() and log_text() == ""
        writer.flush()
        assert events == [("durable", ["0.png", "1.png", "2.png"], "")]
        assert [json.loads(line)["index"] for line in log_text().splitlines()] == [0, 1, 2, 3]
        writer.write({"file_name": "c/4.png", "index": 4, "status": "ok"}, pixels)
    # the block's end flushes what the caller left
    assert events[-1] == ("durable", ["4.png"], log_text().rsplit("\n", 2)[0] + "\n")
    assert sorted(folder.done()) == [0, 1, 2, 3, 4]
    assert "sha256" in folder.records()[0]


def test_a_failed_block_logs_nothing_of_its_batch(tmp_path):
    folder = OutputFolder(tmp_path / "out")
    with pytest.raises(RuntimeError), folder.part_writer("p") as writer:
        writer.write({"file_name": "c/0.png", "index": 0, "status": "ok"},
                     np.zeros((4, 4, 1), dtype=np.uint8))  # fmt: skip
        raise RuntimeError("the sampler broke")
    assert folder.part_file("p").read_text() == ""
    assert len(folder.done()) == 0  # its image is redone


def test_without_syncfs_each_image_and_folder_is_fsynced_before_the_log(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_libc_syncfs", lambda: None)
    synced = []
    fsync = os.fsync

    def spy(fd):
        synced.append(pathlib.Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    folder = OutputFolder(tmp_path / "out")
    with folder.part_writer("p") as writer:
        for i in range(2):
            writer.write({"file_name": f"c/{i}.png", "index": i, "status": "ok"},
                         np.zeros((4, 4, 3), dtype=np.uint8))  # fmt: skip
        writer.flush()
    assert synced == ["0.png", "1.png", "c", "p.jsonl"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="syncfs is Linux's")
def test_syncfs_is_there_on_linux(tmp_path):
    assert atomic._syncfs(tmp_path)


# -- memory flat in n ----------------------------------------------------------------------


#: the columns a run's records share (`sample_record`), as one run writes them
COMMON = ('"digit": "7", "group": "dark", "model": "/models/shipped", "sampler": "deis", '
          '"sampler_options": "{}", "schedule": "karras", "schedule_options": "{}", '
          '"steps": 20, "guidance": "cfg", "guidance_options": "{\\"scale\\": 2.0}", '
          '"filter_nonfinite_flagged": true, "filter_nonfinite_score": null, '
          '"filter_nonfinite_reason": "constant image"')  # fmt: skip


def synthetic_logs(root: pathlib.Path, n: int) -> OutputFolder:
    """`n` records of a run over two parts, interleaved; statuses that need no image on disk
    (resuming looks for the image of every written one)."""
    folder = OutputFolder(root)
    folder.part_file("a").parent.mkdir(parents=True)
    with open(folder.part_file("a"), "w") as a, open(folder.part_file("b"), "w") as b:
        for i in range(n):
            status = "refused" if i % 10 == 0 else "dropped"
            line = f'"file_name": "7_dark/{i:06d}.png", "index": {i}, "seed": {i}, {COMMON}'
            (a if i % 2 else b).write(f'{{{line}, "status": "{status}"}}\n')
    return folder


def peak(call) -> int:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_merge_and_resume_memory_does_not_grow_with_the_records(tmp_path):
    small, large = 5_000, 50_000
    folders = {n: synthetic_logs(tmp_path / str(n), n) for n in (small, large)}
    folders[small].merge()  # first imports and caches, outside the measure
    lines = folders[small].part_file("a").read_text().splitlines()[:1000]
    # what holding every record took before (the dicts alone; pandas' frame came on top)
    record = peak(lambda: [json.loads(line) for line in lines]) / len(lines)
    merges = {n: peak(folders[n].merge) for n in (small, large)}
    resumes = {n: peak(folders[n].done) for n in (small, large)}
    per_record = (merges[large] - merges[small]) / (large - small)
    print(
        f"\nrecord {record:.0f} B; merge peak {merges[small] / 2**20:.2f} MiB at {small}, "
        f"{merges[large] / 2**20:.2f} MiB at {large} ({per_record:.0f} B a record); "
        f"done() peak {resumes[small] / 2**10:.0f} KiB, {resumes[large] / 2**10:.0f} KiB"
    )
    assert per_record < 100 and per_record < record / 5  # a compact index, not the records
    assert merges[large] < large * record / 10
    assert resumes[large] < resumes[small] + 64 * 2**10  # a bit per index
    assert len(folders[large].done()) == large and len(folders[large].done(below=10)) == 10


# -- pieces --------------------------------------------------------------------------------


def test_an_index_set_is_a_set():
    done = IndexSet()
    for i in (5, 0, 70_000, 5, 9):
        done.put(i)
    done.put(9, False)
    done.put(10**6, False)  # taking out what is not there grows nothing
    assert done == {0, 5, 70_000} and len(done) == 3 and list(done) == [0, 5, 70_000]
    assert 5 in done and 9 not in done and -1 not in done and "5" not in done
    assert done & {5, 6} == {5} and isinstance(done - {0}, frozenset)


@pytest.mark.parametrize("tail", [b"", b'{"index": 7, "stat', b"x" * 100_000])
@pytest.mark.parametrize("head", [b"", b'{"index": 0, "status": "refused"}\n' * 3])
def test_a_torn_tail_is_cut_reading_from_the_end(tmp_path, head, tail):
    path = tmp_path / "p.jsonl"
    path.write_bytes(head + tail)
    output._drop_torn_tail(path)
    assert path.read_bytes() == head
