"""The sharded output formats at scale (docs/scale.md), measured side by side in one run.

1. **Flat memory**: peak RSS of a ``--format webdataset`` run of `--n` images on the
   shipped model against one of `--n` / 10 (each in its own process; target: within 1.1x).
2. **Write overhead**: the time the writer takes (PNG encoding, shards or files, part
   logs, fsyncs) as a share of the run's time, for ``webdataset``, ``parquet`` and
   ``imagefolder`` at `--n` / 10 images (target: under 5% for the shards).
3. **datasets loads it**: ``datasets.load_dataset("webdataset", data_dir=OUT)`` on the
   large run has `--n` rows.
4. **Ray**: ``--engine ray --workers 2`` on a local Ray instance against the local engine,
   `--n` / 10 images each, wall time with start-up: the throughput ratio, and whether every
   sample's sha256 equals the local run's at one thread per process (what each worker has).

Run: ``python benchmarks/scale.py [--n 20000] [--out build/scale]`` (about 8 minutes on 2
CPU cores at n = 20,000). Prints a markdown table and the ratios; writes
`--out`/summary.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys

import pandas
from tables import markdown  # benchmarks/tables.py, beside this script

#: the child: one run through the same path as ``dtk generate`` (no metadata read back),
#: with the writers' methods timed; prints peak RSS and the times as JSON
CHILD = """
import json, resource, sys, time
from toolkit.data import output, shards
from toolkit.generation.plan import make_plan
from toolkit.generation.request import GenerationRequest
from toolkit.generation.run import run

spent = [0.0]
def timed(method):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started
    return wrapper
for cls in (output.PartWriter, shards.ShardWriter):
    for name in ("write", "flush", "close"):
        setattr(cls, name, timed(getattr(cls, name)))
out, n, fmt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
plan = make_plan(GenerationRequest(model=None, out=out, n=n, format=fmt, progress=False))
started = time.perf_counter()
merged = run(plan)
seconds = time.perf_counter() - started
print(json.dumps({"images": merged.images, "seconds": seconds, "write_seconds": spent[0],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(out: pathlib.Path, n: int, fmt: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run([sys.executable, "-c", CHILD, str(out), str(n), fmt],
                            capture_output=True, text=True, check=True)  # fmt: skip
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    return {"format": fmt, "n": n, **figures,
            "write_share": figures["write_seconds"] / figures["seconds"]}  # fmt: skip


def engine_run(out: pathlib.Path, n: int, *args: str, threads: str | None = None) -> dict:
    """``dtk generate`` as a user runs it (start-up included): wall time and the sha256s."""
    import time

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(["dtk", "generate", "-n", str(n), "--format", "webdataset", "--out",
                    str(out), "-q", *args, *(["--threads", threads] if threads else [])],
                   check=True)  # fmt: skip
    seconds = time.perf_counter() - started
    sha = pandas.read_csv(out / "metadata.csv").set_index("index")["sha256"]
    return {"seconds": seconds, "sha256": sha}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("build/scale"))
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--engines-only", action="store_true",
                        help="only part 4 (Ray against local)")  # fmt: skip
    args = parser.parse_args()
    small = args.n // 10
    summary: dict = {}
    if not args.engines_only:
        summary = formats(args, small)
    engines(args, small, summary)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def formats(args: argparse.Namespace, small: int) -> dict:
    """Parts 1 to 3: memory, write overhead, datasets."""
    rows = [measure(args.out / fmt, small, fmt) for fmt in ("imagefolder", "webdataset",
                                                            "parquet")]  # fmt: skip
    large = measure(args.out / "webdataset-large", args.n, "webdataset")
    rows.append(large)
    table = pandas.DataFrame(rows)
    print(markdown(table))

    import datasets

    loaded = datasets.load_dataset("webdataset", data_dir=str(args.out / "webdataset-large"),
                                   split="train")  # fmt: skip
    by = {(r["format"], r["n"]): r for r in rows}
    summary = {
        "rss_ratio": large["peak_rss_mib"] / by[("webdataset", small)]["peak_rss_mib"],
        "write_share": {r["format"]: r["write_share"] for r in rows[:3]},
        "write_share_large": large["write_share"],
        "datasets_rows": len(loaded),
        "rows": rows,
    }
    print(f"\npeak RSS at {args.n} against {small}: {summary['rss_ratio']:.3f}x (target <= 1.1)")
    for fmt, share in summary["write_share"].items():
        print(f"write overhead, {fmt}, n = {small}: {share:.1%}")
    print(f"write overhead, webdataset, n = {args.n}: {large['write_share']:.1%} (target < 5%)")
    print(f"datasets.load_dataset('webdataset') rows: {len(loaded)} (target: {args.n})")
    return summary


def engines(args: argparse.Namespace, small: int, summary: dict) -> None:
    """Part 4: Ray's two workers against the local engine."""
    local = engine_run(args.out / "engine-local", small)
    local_one = engine_run(args.out / "engine-local-1", small, threads="1")
    ray = engine_run(args.out / "engine-ray", small, "--engine", "ray", "--workers", "2")
    summary["ray"] = {
        "n": small, "local_seconds": local["seconds"], "ray_seconds": ray["seconds"],
        "throughput_ratio": local["seconds"] / ray["seconds"],
        "identical_to_local_at_one_thread": bool(ray["sha256"].equals(local_one["sha256"])),
        "identical_to_local_at_default_threads": int((ray["sha256"] == local["sha256"]).sum()),
    }  # fmt: skip
    print(f"ray, 2 workers, n = {small}: {ray['seconds']:.1f} s against {local['seconds']:.1f} "
          f"s local: throughput ratio {summary['ray']['throughput_ratio']:.2f}; every sha256 "
          f"equal to the local run at one thread: "
          f"{summary['ray']['identical_to_local_at_one_thread']}")  # fmt: skip


if __name__ == "__main__":
    main()
