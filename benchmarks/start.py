"""Start-up and small runs: how long ``dtk`` takes to answer, measured in fresh processes.

Each command runs `--repeats` times as a new process, alternately, median wall time:

* ``dtk --help``, ``dtk generate --model /nonexistent`` (a mistake must fail fast: no torch
  import before the plan is valid);
* the README's quick example, ``dtk generate --condition digit=7 -n 16 --grid grid.png``
  (into a fresh folder each time);
* ``bare``: a script that imports torch and diffusers' ``UNet2DModel``, loads the shipped
  UNet and makes the same forward passes as the quick example (its default sampler's 20
  network calls, CFG's two branches batched: 32 rows), with nothing written: the floor.

Prints each median and the quick example's ratio to the bare script.
Issue 16's targets: the mistake < 0.5 s, ``--help`` < 0.3 s, quick / bare <= 1.3.

Run: ``python benchmarks/start.py [--repeats 5]``
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

MISSING = "/nonexistent"
BARE = """
import torch
from diffusers import UNet2DModel
from toolkit.generation.generate import default_model

torch.set_grad_enabled(False)
unet = UNet2DModel.from_pretrained(default_model() / "unet").eval()
shape = (32, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
labels = torch.zeros(32, dtype=torch.long)
for t in torch.linspace(999, 0, 20).long():
    x = unet(x, t, class_labels=labels).sample
"""


def dtk() -> str:
    found = shutil.which("dtk", path=str(pathlib.Path(sys.executable).parent))
    return found or "dtk"


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=False, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        outs = iter(range(10**6))

        def quick() -> list[str]:
            k = next(outs)
            return [dtk(), "generate", "--condition", "digit=7", "-n", "16", "--grid",
                    str(root / f"grid{k}.png"), "--out", str(root / f"out{k}")]  # fmt: skip

        commands = {
            "dtk --help": lambda: [dtk(), "--help"],
            "dtk generate --model /nonexistent": lambda: [dtk(), "generate", "--model", MISSING],
            "quick example": quick,
            "bare script": lambda: [sys.executable, "-c", BARE],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, command in commands.items():
                times[name].append(timed(command()))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"{name:36s} {median:6.2f} s")
    ratio = medians["quick example"] / medians["bare script"]
    print(f"{'quick example / bare script':36s} {ratio:6.2f}")


if __name__ == "__main__":
    main()
