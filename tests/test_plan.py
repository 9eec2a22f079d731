"""Plan, then run: a request is checked and resolved from configs alone, before torch is
imported or weights load, in memory that does not grow with the number of samples."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc

import pytest
from invoke import dtk
from tiny_models import save_pipeline

from toolkit import DtkError
from toolkit.generation.plan import make_plan
from toolkit.generation.request import GenerationRequest, GenerationSettings

#: runs `dtk ARGS` in a fresh interpreter and reports the exit status and whether torch
#: (and with it any weights) was imported
PROBE = """
import json, sys
from toolkit.cli import main
sys.argv = ["dtk", *json.loads(sys.argv[1])]
try:
    main()
    status = 0
except SystemExit as exc:
    status = exc.code
print(json.dumps({"status": status, "torch": "torch" in sys.modules}))
"""


def probe(*args: object) -> tuple[dict, str]:
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps([str(a) for a in args])],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent"], "model folder /nonexistent does not exist"),
        (["--guidance", "cfg", "--guidance-option", "scal=3"], "unknown option 'scal'"),
        (["--sampler", "eulr"], "unknown sampler 'eulr'"),
        (["--condition", "digit=11"], "attribute 'digit' has no value '11'"),
        (["--seed", str(2**64)], "is too large"),
    ],
)
def test_a_mistake_is_reported_without_importing_torch(tmp_path, args, message):
    report, stderr = probe("generate", "-n", 1, "--out", tmp_path / "out", *args)
    assert report == {"status": 2, "torch": False}
    [line] = stderr.splitlines()
    assert message in line
    assert not (tmp_path / "out").exists()


def test_a_dry_run_prints_the_plan_without_torch_or_files(tmp_path):
    report, _ = probe("generate", "--condition", "digit=7", "-n", 100_000_000, "--out",
                      tmp_path / "out", "--dry-run")  # fmt: skip
    assert report == {"status": 0, "torch": False}
    result = dtk("generate", "--condition", "digit=7", "-n", 100_000_000, "--out",
                 tmp_path / "out", "--dry-run")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "100,000,000 (indices 0..99999999, seeds 0..99999999)" in result.stdout
    assert "sample 0: digit=7" in result.stdout and "cfg(scale=2.0)" in result.stdout
    assert not (tmp_path / "out").exists()


def peak_bytes(request: GenerationRequest) -> int:
    tracemalloc.start()
    try:
        plan = make_plan(request)
        plan.describe()
        list(zip(range(1000), plan.pending(set(), plan.shard)))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_plan_takes_the_same_memory_for_ten_samples_and_a_hundred_million(tmp_path):
    def request(n: int) -> GenerationRequest:
        return GenerationRequest(None, tmp_path / "out", conditions={"digit": "3"}, n=n)

    make_plan(request(10))  # imports and registry loading are not the plan's memory
    small, large = peak_bytes(request(10)), peak_bytes(request(100_000_000))
    assert large < small + 256 * 1024, (small, large)


def test_per_sample_requests_are_made_on_demand(tmp_path):
    model = save_pipeline(tmp_path / "m", conditional=True)
    conditions = [{"digit": str(i % 3)} for i in range(6)]
    plan = make_plan(GenerationRequest(model, tmp_path / "out", conditions=conditions, n=6,
                                       seed=40))  # fmt: skip
    sample = plan.samples[4]
    assert (sample.index, sample.seed, dict(sample.conditions)) == (4, 44, {"digit": "1"})
    assert list(plan.pending({1, 2}, plan.shard)) == [0, 3, 4, 5]


def test_the_plan_refuses_a_folder_holding_another_run_before_loading(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"seed": 5, "n": 1}))
    with pytest.raises(DtkError, match="holds a different run"):
        make_plan(GenerationRequest(None, out, n=1, settings=GenerationSettings(steps=2)))


@pytest.mark.parametrize("shape, expected", [
    ((3, 32, 32), 64),  # the shipped model, a DiT's 4x32x32 latents
    ((4, 64, 64), 16),  # SD 1.5
    ((4, 128, 128), 4),  # SDXL, PixArt at 1024
    ((16, 128, 128), 1),  # SD 3, Flux
    ((64, 256, 256), 1),  # never below one
])  # fmt: skip
def test_the_default_batch_is_sized_for_the_samples(shape, expected):
    from toolkit import defaults

    assert defaults.batch_size(shape) == expected


def test_a_plan_sizes_the_batch_unless_given(tmp_path):
    from toolkit.generation.generate import default_model
    from toolkit.generation.plan import make_plan
    from toolkit.generation.request import GenerationRequest, GenerationSettings

    plan = make_plan(GenerationRequest(default_model(), out=tmp_path / "a"))
    assert plan.settings.batch_size == 64 and "batches   64 samples each" in plan.describe()
    given = GenerationRequest(default_model(), out=tmp_path / "b",
                              settings=GenerationSettings(batch_size=5))  # fmt: skip
    assert make_plan(given).settings.batch_size == 5
