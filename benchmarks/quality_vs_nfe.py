"""Sample quality against network evaluations on the shipped model: every built-in sampler,
then every schedule under a few samplers, and the best sampler + schedule per NFE budget.

Each cell generates `--per-cell` samples per (digit, group) request (seeds from `--seed`)
and reports the share the shipped classifiers judge to show the requested digit and group,
the mean absolute pixel difference (in 1/255 levels) from a reference solution of the same
noise (`dpmpp_2m` + `karras`, 200 steps, same guidance: the probability-flow ODE's solution
to well below a level), and the wall time. NFE counts network calls, found by running each
sampler on a stand-in denoiser (CFG's two branches are one batched call): a sampler gets the
most steps whose calls fit the budget.

Sections (``--sections``):

- ``samplers``: every built-in sampler but those needing another kind of model (``lcm``,
  ``score_sde_ve``), the adaptive one (``dpm_adaptive``, which picks its own steps) and the
  ``diffusers`` adapter, on ``karras`` (``ddim``/``ddpm``: ``leading``), NFE 5/10/20/50,
  without guidance and with CFG 2;
- ``schedules``: every VP schedule under ``--schedule-samplers`` at NFE 5/10/20, CFG 2;
- the ranking: per NFE, the deterministic sampler + schedule with the highest digit accuracy
  under CFG 2, ties broken by the smaller difference from the reference.

Prints markdown tables and writes `--plot` (PNG) and `--csv`.

Run: ``python benchmarks/quality_vs_nfe.py [--per-cell 5] [--plot docs/quality_vs_nfe.png]``
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import time
from typing import Any

import pandas
import torch
from tables import markdown  # benchmarks/tables.py, beside this script

import toolkit
from toolkit import SampleRequest
from toolkit.generation.generate import default_model
from toolkit.models import load_model
from toolkit.sampling.engine import sample_images

#: not sampled here: another kind of model, adaptive steps, or a scheduler of diffusers'
SKIP = {"lcm", "tcd", "score_sde_ve", "dpm_adaptive", "diffusers"}
#: DDIM and DDPM are defined on the model's timesteps; the k-diffusion family on Karras sigmas
SCHEDULE = {"ddim": "leading", "ddpm": "leading"}
#: schedules that need another kind of model (flow times, an LCM's) or have no step counts
#: beyond their tables
NOT_VP = {"flow", "optimal_steps", "lcm"}
REFERENCE = ("dpmpp_2m", "karras", 200)
GUIDANCE = {"none": {}, "cfg 2": {"scale": 2.0}}


@functools.cache
def calls_for(sampler: str, steps: int) -> int:
    """Network calls `sampler` makes for `steps` steps (on a stand-in denoiser)."""
    levels = toolkit.NoiseLevels.continuous(0.03, 15.0)
    sigmas = toolkit.schedule("karras")(steps, levels)
    calls = 0

    def denoise(x: torch.Tensor, sigma: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return x * 0.5

    x = torch.zeros(1, 1, 2, 2)
    toolkit.sampler(sampler)(denoise, x, sigmas, noise=lambda s, n: torch.zeros_like(x))
    return calls


def steps_for(sampler: str, nfe: int) -> int:
    """The most steps whose network calls fit in `nfe` (at least one step)."""
    steps = 1
    while calls_for(sampler, steps + 1) <= nfe:
        steps += 1
    return steps


def is_stochastic(sampler: str) -> bool:
    """Whether `sampler` draws noise at its defaults (a stand-in run that counts draws)."""
    levels = toolkit.NoiseLevels.continuous(0.03, 15.0)
    sigmas = toolkit.schedule("karras")(4, levels)
    draws = []
    x = torch.zeros(1, 1, 2, 2)

    def noise(sigma: float, sigma_next: float) -> torch.Tensor:
        draws.append(sigma)
        return torch.zeros_like(x)

    toolkit.sampler(sampler)(lambda x, s: x * 0.5, x, sigmas, noise=noise)
    return bool(draws)


class Bench:
    """The shipped model, classifiers, requests and reference images for one run."""

    def __init__(self, per_cell: int, seed: int) -> None:
        self.model = load_model(default_model())
        self.digit_clf = toolkit.attribute_classifier("cnn", attribute="digit")
        self.group_clf = toolkit.attribute_classifier("cnn", attribute="group")
        digits = self.model.labels.attribute("digit").values
        groups = self.model.labels.attribute("group").values
        requests = [{"digit": d, "group": g} for d in digits for g in groups] * per_cell
        self.batch = [SampleRequest(index=i, seed=seed + i, conditions=r)
                      for i, r in enumerate(requests)]  # fmt: skip
        self.want_digit = torch.tensor([self.digit_clf.labels.index(r["digit"]) for r in requests])
        self.want_group = torch.tensor([self.group_clf.labels.index(r["group"]) for r in requests])
        self.references: dict[str, torch.Tensor] = {}

    def images(self, sampler: str, schedule: str, steps: int, guidance: str) -> torch.Tensor:
        sigmas = toolkit.schedule(schedule)(steps, self.model.noise_levels)
        plugin = toolkit.guidance("none" if guidance == "none" else "cfg", **GUIDANCE[guidance])
        return sample_images(self.model, toolkit.sampler(sampler), plugin, sigmas, self.batch)

    def reference(self, guidance: str) -> torch.Tensor:
        if guidance not in self.references:
            self.references[guidance] = self.images(*REFERENCE, guidance)
        return self.references[guidance]

    def cell(self, sampler: str, schedule: str, nfe: int, guidance: str) -> dict[str, Any]:
        steps = steps_for(sampler, nfe)
        start = time.perf_counter()
        images = self.images(sampler, schedule, steps, guidance)
        seconds = time.perf_counter() - start
        digit_ok = self.digit_clf.predict_proba(images).argmax(1) == self.want_digit
        group_ok = self.group_clf.predict_proba(images).argmax(1) == self.want_group
        drift = float((images - self.reference(guidance)).abs().mean()) * 255
        row = {"sampler": sampler, "schedule": schedule, "nfe": nfe, "steps": steps,
               "calls": calls_for(sampler, steps), "guidance": guidance,
               "stochastic": is_stochastic(sampler),
               "digit_acc": float(digit_ok.float().mean()),
               "group_acc": float(group_ok.float().mean()),
               "drift_255": round(drift, 2), "seconds": round(seconds, 2),
               "n": len(self.batch)}  # fmt: skip
        print(f"{sampler:28s} {schedule:17s} nfe {nfe:3d} {guidance:5s} digit "
              f"{row['digit_acc']:.3f} group {row['group_acc']:.3f} drift {drift:6.2f} "
              f"{seconds:6.1f}s", flush=True)  # fmt: skip
        return row


def builtin(kind: str) -> list[str]:
    listing = toolkit.plugins()
    rows = listing[(listing["kind"] == kind) & (listing["distribution"] == "diffusion-toolkit")]
    return list(rows["name"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-cell", type=int, default=5, help="samples per (digit, group)")
    parser.add_argument("--nfe", default="5,10,20,50")
    parser.add_argument("--schedule-nfe", default="5,10,20")
    parser.add_argument("--samplers", default=None, help="default: every built-in")
    parser.add_argument("--schedule-samplers", default="dpmpp_2m,unipc,res_multistep,euler")
    parser.add_argument("--sections", default="samplers,schedules")
    parser.add_argument("--plot", type=pathlib.Path, default=None)
    parser.add_argument("--csv", type=pathlib.Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bench = Bench(args.per_cell, args.seed)
    sections = args.sections.split(",")
    rows = []
    if "samplers" in sections:
        samplers = (args.samplers.split(",") if args.samplers
                    else [s for s in builtin("sampler") if s not in SKIP])  # fmt: skip
        for name in samplers:
            for nfe in (int(n) for n in args.nfe.split(",")):
                for guidance in ("none", "cfg 2"):
                    rows.append(bench.cell(name, SCHEDULE.get(name, "karras"), nfe, guidance))
    if "schedules" in sections:
        schedules = [s for s in builtin("schedule") if s not in NOT_VP]
        for name in args.schedule_samplers.split(","):
            for schedule in schedules:
                for nfe in (int(n) for n in args.schedule_nfe.split(",")):
                    rows.append(bench.cell(name, schedule, nfe, "cfg 2"))

    table = pandas.DataFrame(rows).drop_duplicates(["sampler", "schedule", "nfe", "guidance"])
    print()
    print(markdown(table))
    print()
    print(markdown(best(table)))
    if args.csv:
        table.to_csv(args.csv, index=False)
    if args.plot:
        plot(table, args.plot)


def best(table: pandas.DataFrame) -> pandas.DataFrame:
    """Per NFE, the deterministic sampler + schedule with the highest digit accuracy under
    CFG 2, ties broken by the smaller drift from the reference."""
    guided = table[(table["guidance"] == "cfg 2") & ~table["stochastic"]]
    ranked = guided.sort_values(["nfe", "digit_acc", "drift_255"], ascending=[True, False, True])
    return ranked.groupby("nfe").head(3)[
        ["nfe", "sampler", "schedule", "steps", "digit_acc", "group_acc", "drift_255"]
    ]


def plot(table: pandas.DataFrame, path: pathlib.Path) -> None:
    """The deterministic samplers' drift from the reference against NFE, on ``karras``
    (``ddim``: ``leading``), without guidance and with CFG 2 (a stochastic sampler's
    samples are other samples of the same distribution: their drift measures no error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    own = table["schedule"] == table["sampler"].map(lambda name: SCHEDULE.get(name, "karras"))
    rows = table[own & ~table["stochastic"]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, guidance in zip(axes, ["none", "cfg 2"]):
        part = rows[rows["guidance"] == guidance]
        for k, (name, group) in enumerate(part.groupby("sampler", sort=True)):
            style = ("-", "--", ":")[k // 10]
            ax.plot(group["nfe"], group["drift_255"], marker="o", label=name, linewidth=1.1,
                    linestyle=style, markersize=3)  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted(part["nfe"].unique())
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_title(f"guidance: {guidance}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean |difference| from the 200-step ODE solution (1/255)")
    axes[1].legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
