"""The output path of ``dtk generate`` (issue 16), measured side by side in one run.

* **write path**: `--images` synthetic 32x32 PNGs in batches of `--batch`, each written as
  a run writes it (PNG encoding, sha256, the record appended to the part log), durable two
  ways, alternately, median of `--repeats`: an fsync per PNG before its rename and an
  fsync of the log per batch (before), and images renamed without waiting, then one
  ``syncfs`` (elsewhere an fsync per file) per batch before the records are logged (now:
  `toolkit.data.output.PartWriter`); plus neither, the floor.
* **merge**: part logs of `--records` synthetic records (two counts; the columns a run of
  the shipped model writes, over two shards) merged into metadata.csv and rejected.csv as
  before (every record in memory, then pandas) and now (streamed); and resuming
  (`done()`) both ways. Each in a fresh process: its time and its peak memory (the peak
  resident set over the call, Linux's VmHWM reset before it), with the ratio of the two
  counts' peaks.

Run: ``python benchmarks/output_path.py [--images 512] [--batch 64] [--repeats 3]
[--records 20000,200000]``
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from toolkit.data.images import encode_png
from toolkit.data.output import OutputFolder, atomic_write

# -- write path ----------------------------------------------------------------------------


def write_before(root: pathlib.Path, images: np.ndarray, batch: int) -> None:
    """The writer before issue 16: an fsync per PNG, then the log's fsync per batch."""
    log = root / ".dtk" / "parts" / "p.jsonl"
    log.parent.mkdir(parents=True)
    with open(log, "a", encoding="utf-8") as handle:
        for start in range(0, len(images), batch):
            for i in range(start, min(start + batch, len(images))):
                data = encode_png(images[i])
                atomic_write(root / "c" / f"{i:06d}.png", data)  # fsync before the rename
                record = {"file_name": f"c/{i:06d}.png", "index": i, "status": "ok",
                          "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def write_now(root: pathlib.Path, images: np.ndarray, batch: int) -> None:
    """`PartWriter` as a run uses it: write every image of a batch, then flush."""
    with OutputFolder(root).part_writer("p") as writer:
        for start in range(0, len(images), batch):
            for i in range(start, min(start + batch, len(images))):
                writer.write({"file_name": f"c/{i:06d}.png", "index": i, "status": "ok"},
                             images[i])  # fmt: skip
            writer.flush()


def write_floor(root: pathlib.Path, images: np.ndarray, batch: int) -> None:
    """The same files with no durability at all: what encoding and renaming cost."""
    log = root / ".dtk" / "parts" / "p.jsonl"
    log.parent.mkdir(parents=True)
    with open(log, "a", encoding="utf-8") as handle:
        for i in range(len(images)):
            data = encode_png(images[i])
            atomic_write(root / "c" / f"{i:06d}.png", data, durable=False)
            record = {"file_name": f"c/{i:06d}.png", "index": i, "status": "ok",
                      "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip
            handle.write(json.dumps(record) + "\n")


WRITERS = {"fsync per PNG (before)": write_before, "durable per batch (now)": write_now,
           "no durability (floor)": write_floor}  # fmt: skip


def write_path(images: int, batch: int, repeats: int, scratch: pathlib.Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (images, 32, 32, 3), dtype=np.uint8)
    times: dict[str, list[float]] = {name: [] for name in WRITERS}
    for repeat in range(repeats):
        for name, write in WRITERS.items():  # alternately: the disk's mood hits all alike
            root = scratch / f"write-{repeat}-{len(times[name])}-{abs(hash(name))}"
            started = time.perf_counter()
            write(root, pixels, batch)
            times[name].append(time.perf_counter() - started)
            shutil.rmtree(root)
    before = statistics.median(times["fsync per PNG (before)"])
    print(f"\nwrite path: {images} PNGs of 32x32, batches of {batch}, median of {repeats}")
    print("| writer | seconds | ms per image | / before |\n| --- | --- | --- | --- |")
    for name, measured in times.items():
        seconds = statistics.median(measured)
        print(f"| {name} | {seconds:.3f} | {seconds / images * 1000:.3f} | "
              f"{seconds / before:.3f} |")  # fmt: skip


# -- merge and resume ----------------------------------------------------------------------

#: the columns a record of the shipped model's run has besides file name, index and seed
COMMON = {"digit": "7", "group": "dark", "model": "/models/shipped", "sampler": "deis",
          "sampler_options": "{}", "schedule": "karras", "schedule_options": "{}", "steps": 20,
          "guidance": "cfg", "guidance_options": '{"scale": 2.0}',
          "filter_nonfinite_flagged": False, "filter_nonfinite_score": None,
          "filter_nonfinite_reason": ""}  # fmt: skip


def synthetic_logs(root: pathlib.Path, n: int, written: str = "ok") -> None:
    """`n` records over two shards; one in 50 rejected, the rest `written` (there are no
    image files: merging does not look for them, resuming would for status ``ok``)."""
    parts = root / ".dtk" / "parts"
    parts.mkdir(parents=True)
    common = json.dumps(COMMON)[1:-1]
    with open(parts / "shard-0000-of-0002.jsonl", "w") as even, \
         open(parts / "shard-0001-of-0002.jsonl", "w") as odd:  # fmt: skip
        for i in range(n):
            status = "dropped" if i % 50 == 0 else written
            tail = f', "sha256": "{i:064x}"' if status != "dropped" else ""
            (odd if i % 2 else even).write(
                f'{{"file_name": "7_dark/{i:06d}.png", "index": {i}, "seed": {i}, {common}, '
                f'"status": "{status}"{tail}}}\n'
            )


def merge_before(root: pathlib.Path) -> None:
    """The merge before issue 16: every record in a dict, then pandas' frames."""
    import pandas

    folder = OutputFolder(root)
    by_index = folder.records()
    records = [by_index[i] for i in sorted(by_index)]
    written = [r for r in records if r["status"] in ("ok", "tagged", "blank")]
    rejected = [r for r in records if r["status"] not in ("ok", "tagged", "blank")]
    metadata = pandas.DataFrame.from_records(written)
    atomic_write(root / "metadata.csv", metadata.to_csv(index=False).encode())
    frame = pandas.DataFrame.from_records(rejected).drop(columns="file_name")
    atomic_write(root / "rejected.csv", frame.to_csv(index=False).encode())


def done_before(root: pathlib.Path) -> None:
    """Resuming before issue 16: a set of every done index, from every record."""
    folder = OutputFolder(root)
    {i for i, r in folder.records().items() if r["status"] not in ("ok", "tagged", "blank")}


CALLS = {"merge before": merge_before, "merge now": lambda root: OutputFolder(root).merge(),
         "resume before": done_before,
         "resume now": lambda root: OutputFolder(root).done()}  # fmt: skip


def child(call: str, root: pathlib.Path) -> None:
    """One measured call in this (fresh) process: prints seconds and peak bytes over it."""
    # imports are not the call's memory (a run has numpy loaded; pandas was imported to merge)
    if call == "merge before":
        import pandas  # noqa: F401
    rss = _status("VmRSS")
    with contextlib.suppress(OSError):  # VmHWM := VmRSS (else the process's peak so far)
        pathlib.Path("/proc/self/clear_refs").write_text("5")
    started = time.perf_counter()
    CALLS[call](root)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak": _status("VmHWM") - rss}))


def _status(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def merges(counts: list[int], scratch: pathlib.Path) -> None:
    results: dict[tuple[str, int], dict[str, float]] = {}
    for n in counts:
        for call in CALLS:
            root = scratch / f"logs-{n}-{call.replace(' ', '-')}"
            # resuming: statuses whose image nobody looks for (there are no files)
            synthetic_logs(root, n, "refused" if call.startswith("resume") else "ok")
            out = subprocess.run([sys.executable, __file__, "--child", call, str(root)],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            results[call, n] = json.loads(out.stdout)
            shutil.rmtree(root)
    small, large = counts
    print(f"\nmerge and resume: part logs of {small:,} and {large:,} records (two shards)")
    print(f"| call | seconds at {small:,} | seconds at {large:,} | peak MiB at {small:,} | "
          f"peak MiB at {large:,} | peak ratio | bytes a record |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for call in CALLS:
        a, b = results[call, small], results[call, large]
        per = (b["peak"] - a["peak"]) / (large - small)
        print(f"| {call} | {a['seconds']:.2f} | {b['seconds']:.2f} | {a['peak'] / 2**20:.2f} | "
              f"{b['peak'] / 2**20:.2f} | {b['peak'] / max(a['peak'], 1):.2f} | "
              f"{per:.0f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--records", default="20000,200000", help="two counts, comma-separated")
    parser.add_argument("--scratch", type=pathlib.Path, help="where to write (default: a "
                        "temporary folder; the disk under test)")  # fmt: skip
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], pathlib.Path(args.child[1]))
        return
    counts = [int(c) for c in args.records.split(",")]
    if len(counts) != 2:
        parser.error("--records takes two counts")
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        write_path(args.images, args.batch, args.repeats, pathlib.Path(scratch))
        merges(counts, pathlib.Path(scratch))


if __name__ == "__main__":
    main()
