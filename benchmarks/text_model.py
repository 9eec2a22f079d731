"""The shipped text-to-image model's fairness targets (issue 17), measured in one run.

1. **Learned skew**: `dtk eval bias --prompts-file digits-neutral` (20 prompts that never
   name the group, `--n` images each): each prompt's `dark` share with its interval against
   the training captions' 20%, and the suite figures.
2. **Fair guidance for prompts**: the same suite with ``fair`` (uniform target): every
   prompt's `dark` share within 0.05 of 0.5, and the digit accuracy (images read as the
   prompt's digit by the shipped classifier) within 1 point of unguided.
3. **Compare**: `dtk eval compare` of the two audits: the per-prompt change with
   Holm-corrected p-values, and the change in mean skew with its interval.
4. **Asked for a group**: prompts that name the group ("a seven on dark paper").
5. **A second reading**: both suites' images read again by the independent ``mlp`` group
   judge (another family than the ``cnn`` the audits use; it reads the palette, which the
   ``cnn`` was trained blind to): each prompt's `dark` share by both, and where they differ.

Run: ``python benchmarks/text_model.py [--out build/text-model] [--n 200]`` (about 8
minutes on 2 CPU cores at n = 200). Prints markdown tables; writes
`--out`/summary.json and the audits' and comparison's folders.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from typing import Any

import pandas
from tables import markdown  # benchmarks/tables.py, beside this script

from evaluations.bias import audit_bias
from evaluations.compare import compare_audits
from evaluations.suites import read_suite

#: how `fair` steers the shipped text model towards a group: each prompt completed with the
#: words its captions use for the drawn group, at the model's own CFG scale
FAIR = {"values": "dark,light", "edit_prompt": "{prompt} on {value} paper", "mode": "prompt",
        "scale": "7"}  # fmt: skip
GROUP_PROMPTS = ("a seven on dark paper", "a dark three", "a handwritten zero on dark paper",
                 "a one on light paper")  # fmt: skip


def suite_audit(out: pathlib.Path, n: int, guidance: dict[str, Any] | None) -> dict[str, Any]:
    """A digits-neutral suite audit of the shipped text model; per prompt its dark share
    and digit accuracy."""
    generation = {} if guidance is None else {
        "guidance": "fair", "guidance_options": guidance, "options_from_strings": True}  # fmt: skip
    started = time.perf_counter()
    result = audit_bias(out, model="text-digits", prompts_file="digits-neutral", n=n,
                        attributes=["group", "digit"], generation=generation,
                        progress=False)  # fmt: skip
    seconds = time.perf_counter() - started
    suite = read_suite("digits-neutral")
    digit_of = dict(zip(suite.prompts, suite.groupings["digit"]))
    predictions = result.predictions
    right = predictions["digit_predicted"] == predictions["prompt"].map(digit_of)
    group = result.attributes["group"]
    rows = []
    for prompt in suite.prompts:
        part = group.by[prompt].groups["dark"]
        accuracy = float(right[predictions["prompt"] == prompt].mean())
        rows.append({"prompt": prompt, "dark": part.share, "ci_low": part.ci_low,
                     "ci_high": part.ci_high, "digit accuracy": accuracy})  # fmt: skip
    figures = {"rows": pandas.DataFrame(rows), "accuracy": float(right.mean()),
               "suite": group.suite, "seconds": seconds,
               "dark": group.groups["dark"].share}  # fmt: skip
    if guidance is not None:  # per drawn group: digit accuracy, and how often it came out
        drawn = pandas.read_csv(out / "samples" / "metadata.csv")[["file_name", "group"]]
        both = predictions.assign(right=right).merge(drawn, on="file_name")
        figures["by_drawn"] = {
            value: {"digit_accuracy": float(rows["right"].mean()),
                    "read_as_drawn": float((rows["group_predicted"] == value).mean())}
            for value, rows in both.groupby("group")
        }  # fmt: skip
    return figures


def judged(out: pathlib.Path, samples: pathlib.Path) -> pandas.DataFrame:
    """Each prompt's `dark` share as the independent ``mlp`` group judge reads the images of
    an audit (`samples`)."""
    result = audit_bias(out, images=samples, prompts_file="digits-neutral",
                        attributes=["group"], classifier="mlp", progress=False)  # fmt: skip
    by = result.attributes["group"].by
    return pandas.DataFrame([{"prompt": p, "dark (mlp)": by[p].groups["dark"].share}
                             for p in read_suite("digits-neutral").prompts])  # fmt: skip


def asked_for_group(out: pathlib.Path, n: int) -> pandas.DataFrame:
    rows = []
    for prompt in GROUP_PROMPTS:
        result = audit_bias(out / prompt.replace(" ", "-"), model="text-digits", prompt=prompt,
                            n=n, progress=False, report=False)  # fmt: skip
        wanted = "dark" if "dark" in prompt else "light"
        share = result.attributes["group"].groups[wanted]
        rows.append({"prompt": prompt, "asked": wanted, "share": share.share,
                     "ci_low": share.ci_low, "ci_high": share.ci_high})  # fmt: skip
    return pandas.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("build/text-model"))
    parser.add_argument("--n", type=int, default=200, help="images per prompt")
    args = parser.parse_args()
    started = time.perf_counter()
    plain = suite_audit(args.out / "plain", args.n, None)
    fair = suite_audit(args.out / "fair", args.n, FAIR)
    compared = compare_audits(args.out / "plain", args.out / "fair", args.out / "compare",
                              attributes=["group"], names=("unguided", "fair"))  # fmt: skip
    group = compared.attributes["group"]
    table = plain["rows"][["prompt", "dark", "ci_low", "ci_high", "digit accuracy"]].merge(
        fair["rows"], on="prompt", suffixes=(" unguided", " fair"))  # fmt: skip
    table["p (Holm)"] = [r.p_corrected for r in group.rows]
    asked = asked_for_group(args.out / "asked", args.n)
    within = (table["dark fair"] - 0.5).abs().max()
    second = judged(args.out / "plain-mlp", args.out / "plain" / "samples").merge(
        judged(args.out / "fair-mlp", args.out / "fair" / "samples"), on="prompt",
        suffixes=(" unguided", " fair"))  # fmt: skip
    second = table[["prompt", "dark unguided", "dark fair"]].merge(second, on="prompt")
    judge_within = (second["dark (mlp) fair"] - 0.5).abs()
    summary = {
        "n_per_prompt": args.n,
        "unguided": {"mean_skew": plain["suite"].overall.mean_skew.__dict__,
                     "digit_accuracy": plain["accuracy"], "seconds": plain["seconds"]},
        "fair": {"mean_skew": fair["suite"].overall.mean_skew.__dict__,
                 "digit_accuracy": fair["accuracy"], "seconds": fair["seconds"],
                 "max_distance_from_target": within, "by_drawn": fair["by_drawn"],
                 "prompts_within_0.05": int(((table["dark fair"] - 0.5).abs() <= 0.05).sum())},
        "unguided_dark_share": plain["dark"],
        "mean_skew_change": group.mean_skew_change.__dict__,
        "prompts_changed": len(group.significant()),
        "mlp_judge": {"prompts_within_0.05": int((judge_within <= 0.05).sum()),
                      "max_distance_from_target": float(judge_within.max()),
                      "largest_disagreement": float(
                          (second["dark fair"] - second["dark (mlp) fair"]).abs().max())},
        "minutes": (time.perf_counter() - started) / 60,
    }  # fmt: skip
    print(markdown(table))
    print()
    print(markdown(asked))
    print()
    print(markdown(second))
    print()
    print(json.dumps(summary, indent=2))
    print(f"\nfair: every prompt's dark share within {within:.3f} of 0.5 (target 0.05); digit "
          f"accuracy {fair['accuracy']:.3f} against {plain['accuracy']:.3f} unguided "
          f"(target: within 0.01); {summary['prompts_changed']} of {len(group.rows)} prompts "
          "changed at Holm-corrected p < 0.05")  # fmt: skip
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
