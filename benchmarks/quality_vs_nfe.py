"""Sample quality against network evaluations, for every built-in sampler, on the shipped model.

For each sampler x NFE {5, 10, 20, 50} x guidance {none, CFG 2}: generate `--per-cell`
samples per (digit, group) request, and report the share the shipped classifiers judge to
show the requested digit and the requested group, and the wall time. NFE counts network
calls (CFG's conditional and unconditional branches run in one batched call); samplers
taking two calls per step get half the steps. Prints a table (markdown) and writes
`--plot` (PNG) and `--csv`.

Run: ``python benchmarks/quality_vs_nfe.py [--per-cell 5] [--plot docs/quality_vs_nfe.png]``
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import time

import pandas
import torch
from tables import markdown  # benchmarks/tables.py, beside this script

import toolkit
from toolkit import SampleRequest
from toolkit.generation.generate import default_model
from toolkit.models import load_model
from toolkit.sampling.engine import sample_images

TWO_CALLS = {"heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde"}
SAMPLERS = ["ddim", "ddpm", "euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral",
            "lms", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde",
            "dpmpp_3m_sde", "unipc"]  # fmt: skip
# DDIM and DDPM are defined on the model's timesteps; the k-diffusion family on Karras sigmas.
SCHEDULE = {"ddim": "leading", "ddpm": "leading"}


def steps_for(sampler: str, nfe: int) -> int:
    # two-call samplers use one call on their last step: 2 * steps - 1 calls
    return max(1, (nfe + 1) // 2) if sampler in TWO_CALLS else nfe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-cell", type=int, default=5, help="samples per (digit, group)")
    parser.add_argument("--nfe", default="5,10,20,50")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--plot", type=pathlib.Path, default=None)
    parser.add_argument("--csv", type=pathlib.Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = load_model(default_model())
    digit_clf = toolkit.attribute_classifier("cnn", attribute="digit")
    group_clf = toolkit.attribute_classifier("cnn", attribute="group")
    digits = model.labels.attribute("digit").values
    groups = model.labels.attribute("group").values
    requests = [{"digit": d, "group": g} for d in digits for g in groups] * args.per_cell
    batch = [SampleRequest(index=i, seed=args.seed + i, conditions=r)
             for i, r in enumerate(requests)]  # fmt: skip
    want_digit = torch.tensor([digit_clf.labels.index(r["digit"]) for r in requests])
    want_group = torch.tensor([group_clf.labels.index(r["group"]) for r in requests])

    rows = []
    nfes = [int(n) for n in args.nfe.split(",")]
    for name, nfe, scale in itertools.product(args.samplers.split(","), nfes, (None, 2.0)):
        steps = steps_for(name, nfe)
        sigmas = toolkit.schedule(SCHEDULE.get(name, "karras"))(steps, model.noise_levels)
        guidance = (
            toolkit.guidance("none") if scale is None else toolkit.guidance("cfg", scale=scale)
        )
        start = time.perf_counter()
        images = sample_images(model, toolkit.sampler(name), guidance, sigmas, batch)
        seconds = time.perf_counter() - start
        digit_ok = digit_clf.predict_proba(images).argmax(1) == want_digit
        group_ok = group_clf.predict_proba(images).argmax(1) == want_group
        rows.append({
            "sampler": name, "schedule": SCHEDULE.get(name, "karras"), "nfe": nfe,
            "steps": steps, "guidance": "none" if scale is None else f"cfg {scale:g}",
            "digit_acc": float(digit_ok.float().mean()),
            "group_acc": float(group_ok.float().mean()),
            "both_acc": float((digit_ok & group_ok).float().mean()),
            "seconds": round(seconds, 2), "n": len(requests),
        })  # fmt: skip
        print(f"{name:20s} nfe {nfe:3d} {rows[-1]['guidance']:6s} digit "
              f"{rows[-1]['digit_acc']:.3f} group {rows[-1]['group_acc']:.3f} "
              f"{seconds:6.1f}s", flush=True)  # fmt: skip

    table = pandas.DataFrame(rows)
    print()
    print(markdown(table))
    if args.csv:
        table.to_csv(args.csv, index=False)
    if args.plot:
        plot(table, args.plot)


def plot(table: pandas.DataFrame, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, guidance in zip(axes, ["none", "cfg 2"]):
        part = table[table["guidance"] == guidance]
        for name, rows in part.groupby("sampler", sort=False):
            ax.plot(rows["nfe"], rows["digit_acc"], marker="o", label=name, linewidth=1.2)
        ax.set_xscale("log")
        ax.set_xticks(sorted(part["nfe"].unique()), [str(n) for n in sorted(part["nfe"].unique())])
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_title(f"guidance: {guidance}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("requested digit recognised (share)")
    axes[1].legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
