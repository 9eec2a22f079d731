"""`dtk generate` / `toolkit.generate` on tiny random diffusers folders."""

from __future__ import annotations

import json

import numpy as np
import pandas
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDIMPipeline, DDIMScheduler
from folders import pixels
from PIL import Image
from tiny_models import save_bare_unet, save_pipeline

import toolkit
from toolkit import defaults
from toolkit.cli import cli
from toolkit.generation.generate import generate


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "uncond": save_pipeline(root / "uncond"),
        "cond": save_pipeline(root / "cond", conditional=True),
        "v": save_pipeline(root / "v", prediction_type="v_prediction"),
        "sample": save_pipeline(root / "sample", prediction_type="sample"),
        "bare": save_bare_unet(root / "bare"),
    }


def diffusers_ddim(model_dir, n, seed, steps, **scheduler_kwargs) -> np.ndarray:
    pipe = DDIMPipeline.from_pretrained(model_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **scheduler_kwargs)
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
    images = pipe(
        batch_size=n, generator=generators, num_inference_steps=steps, eta=0.0, output_type="np"
    ).images
    return np.round(images * 255).astype(np.int16)


@pytest.mark.parametrize("kind", ["uncond", "v", "sample"])
def test_ddim_equals_diffusers_ddim_pipeline(models, tmp_path, kind):
    out = tmp_path / "out"
    generate(models[kind], out=out, n=3, seed=5, sampler="ddim", schedule="leading", steps=10,
             batch_size=2, progress=False)  # fmt: skip
    ours = pixels(out)
    theirs = diffusers_ddim(models[kind], 3, 5, 10)
    for i in range(3):
        assert np.abs(ours[i] - theirs[i]).max() <= 1, f"sample {i}"
    # the comparison has teeth: another seed gives other images
    assert np.abs(ours[0] - diffusers_ddim(models[kind], 1, 6, 10)[0]).max() > 10


def test_diffusers_adapter_equals_ours_and_diffusers(models, tmp_path):
    runner = CliRunner()
    out = tmp_path / "adapter"
    result = runner.invoke(cli, [
        "generate", "--model", str(models["uncond"]), "-n", "2", "--seed", "5",
        "--sampler", "diffusers", "--sampler-option", "scheduler=DDIMScheduler",
        "--steps", "10", "--out", str(out), "-q",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    adapter = pixels(out)
    theirs = diffusers_ddim(models["uncond"], 2, 5, 10)
    ours_dir = tmp_path / "ours"
    generate(models["uncond"], out=ours_dir, n=2, seed=5, sampler="ddim", schedule="leading",
             steps=10, progress=False)  # fmt: skip
    ours = pixels(ours_dir)
    for i in range(2):
        assert np.abs(adapter[i] - theirs[i]).max() <= 1
        assert np.abs(adapter[i] - ours[i]).max() <= 1


def test_samples_do_not_depend_on_batch_size_or_shard(models, tmp_path):
    kw = dict(n=7, seed=11, sampler="euler_ancestral", schedule="karras", steps=6, progress=False)
    runs = {}
    for batch in (1, 4, 7):
        out = tmp_path / f"b{batch}"
        generate(models["cond"], out=out, conditions={"digit": "1"}, batch_size=batch, **kw)
        runs[batch] = pixels(out)
    sharded = tmp_path / "sharded"
    for k in (0, 1):
        generate(models["cond"], out=sharded, conditions={"digit": "1"}, batch_size=3,
                 shard=f"{k}/2", **kw)  # fmt: skip
    result = CliRunner().invoke(cli, ["merge", str(sharded)])
    assert result.exit_code == 0, result.output
    runs["shards"] = pixels(sharded)
    assert sorted(runs["shards"]) == list(range(7))
    for name, images in runs.items():
        for i in range(7):
            assert np.abs(images[i] - runs[1][i]).max() <= 1, (name, i)
    # stochastic sampler: different samples really differ
    assert np.abs(runs[1][0] - runs[1][1]).max() > 10


def test_output_folder_contract(models, tmp_path):
    out = tmp_path / "out"
    grid = tmp_path / "grid.png"
    result = CliRunner().invoke(cli, [
        "generate", "--model", str(models["cond"]), "--condition", "digit=2",
        "--condition", "group=dark", "-n", "3", "--steps", "4", "--out", str(out),
        "--grid", str(grid), "--filter", "nonfinite",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "generating" in result.stderr and result.stdout == ""
    metadata = pandas.read_csv(out / "metadata.csv", keep_default_na=False)
    assert metadata.columns[0] == "file_name"
    assert list(metadata["file_name"]) == [f"2_dark/{i:06d}.png" for i in range(3)]
    assert list(metadata["seed"]) == [0, 1, 2]
    assert set(metadata["digit"].astype(str)) == {"2"} and set(metadata["group"]) == {"dark"}
    assert list(metadata["guidance"]) == ["cfg"] * 3  # the default for a conditioned request
    assert not metadata["filter_nonfinite_flagged"].any()
    for row in metadata.itertuples():
        import hashlib

        assert hashlib.sha256((out / row.file_name).read_bytes()).hexdigest() == row.sha256
    run = json.loads((out / "run.json").read_text())
    assert run["sampler"] == {"name": defaults.LABEL_SAMPLER, "options": {}}
    assert run["conditions"] == {"digit": "2", "group": "dark"}
    assert {p["name"] for p in run["plugins"]} == {defaults.LABEL_SAMPLER, "karras", "cfg",
                                                   "nonfinite"}  # fmt: skip
    assert all(p["distribution"] == "diffusion-toolkit" for p in run["plugins"])
    import importlib.metadata

    assert run["versions"] == {
        dist: importlib.metadata.version(dist)
        for dist in ("diffusion-toolkit", "torch", "diffusers", "transformers")
    }
    assert pandas.read_csv(out / "rejected.csv").empty
    assert Image.open(grid).size[0] > 8
    assert not list(out.rglob("*.tmp"))


def test_bare_unet_folder_and_resume_with_larger_n(models, tmp_path):
    out = tmp_path / "out"
    kw = dict(out=out, seed=3, sampler="dpmpp_2m", steps=4, progress=False)
    generate(models["bare"], n=2, **kw)
    first = {p.name: p.stat().st_mtime_ns for p in (out / "unconditional").iterdir()}
    metadata = generate(models["bare"], n=4, **kw)
    assert len(metadata) == 4
    after = {p.name: p.stat().st_mtime_ns for p in (out / "unconditional").iterdir()}
    assert {k: after[k] for k in first} == first  # done samples are not redone
    assert len(after) == 4
    again = generate(models["bare"], n=4, **kw)
    assert len(again) == 4 and again.equals(metadata)


def test_a_different_run_in_the_same_folder_is_refused(models, tmp_path):
    out = tmp_path / "out"
    generate(models["uncond"], out=out, n=1, steps=2, progress=False)
    with pytest.raises(toolkit.DtkError, match="holds a different run"):
        generate(models["uncond"], out=out, n=1, steps=3, progress=False)


def test_cfg_is_one_batched_forward_per_step(models, tmp_path, monkeypatch):
    from toolkit.models.label_unet import LabelUNet

    batches = []
    original = LabelUNet.denoise

    def spy(self, x, sigma, class_labels=None):
        batches.append((x.shape[0], None if class_labels is None else class_labels.tolist()))
        return original(self, x, sigma, class_labels=class_labels)

    monkeypatch.setattr(LabelUNet, "denoise", spy)
    generate(models["cond"], out=tmp_path / "cfg", conditions={"digit": "1"}, n=3,
             batch_size=3, sampler="euler", steps=5, guidance="cfg",
             guidance_options={"scale": 3.0}, progress=False)  # fmt: skip
    assert len(batches) == 5  # one forward per Euler step
    null = 11  # digit and group unspecified: (3) + (2) * 4
    cond = 1 + 2 * 4  # digit=1, group unspecified
    assert all(b == (6, [cond] * 3 + [null] * 3) for b in batches)

    batches.clear()
    generate(models["cond"], out=tmp_path / "interval", conditions={"digit": "1"}, n=2,
             sampler="euler", schedule="karras", steps=6, guidance="interval",
             guidance_options={"lo": 1.0, "hi": 10.0}, progress=False)  # fmt: skip
    sizes = [b[0] for b in batches]
    assert 2 in sizes and 4 in sizes  # CFG inside [lo, hi] only; no wasted forward outside


def test_cfg_combines_as_the_formula_says():
    cond, uncond = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    preds = {"cond": cond, "uncond": uncond}
    torch.testing.assert_close(toolkit.guidance("cfg", scale=3.0)(preds, 1.0),
                               uncond + 3 * (cond - uncond))  # fmt: skip
    rescaled = toolkit.guidance("cfg_rescale", scale=3.0, phi=1.0)(preds, 1.0)
    torch.testing.assert_close(rescaled.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))
    assert toolkit.guidance("interval", lo=1, hi=2).active(5.0) == ("cond",)


@pytest.mark.parametrize("on_flag, status", [("drop", "dropped"), ("tag", "tagged"),
                                             ("blank", "blank")])  # fmt: skip
def test_on_flag_policies(models, tmp_path, on_flag, status):
    out = tmp_path / on_flag
    metadata = generate(models["uncond"], out=out, n=2, steps=3, filters=["nonfinite"],
                        filter_options={"nonfinite": {"min_std": 10.0}},  # flags everything
                        on_flag=on_flag, progress=False)  # fmt: skip
    rejected = pandas.read_csv(out / "rejected.csv")
    if on_flag == "drop":
        assert metadata.empty and list(rejected["status"]) == ["dropped"] * 2
        assert not (out / "unconditional").exists()
    else:
        assert list(metadata["status"]) == [status] * 2 and rejected.empty
        assert metadata["filter_nonfinite_flagged"].all()
        images = pixels(out, metadata)
        assert (images[0].max() == 0) == (on_flag == "blank")


def test_blocklist_refuses_before_compute(models, tmp_path, monkeypatch):
    from toolkit.models.label_unet import LabelUNet

    def no_compute(*args, **kwargs):
        raise AssertionError("a refused request must not reach the model")

    monkeypatch.setattr(LabelUNet, "denoise", no_compute)
    result = CliRunner().invoke(cli, [
        "generate", "--model", str(models["cond"]), "--condition", "group=dark", "-n", "2",
        "--filter", "blocklist", "--filter-option", "words=Dark,other", "--out",
        str(tmp_path / "out"), "-q",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    rejected = pandas.read_csv(tmp_path / "out" / "rejected.csv")
    assert list(rejected["status"]) == ["refused"] * 2
    assert rejected["filter_blocklist_reason"].str.contains("dark").all()


def test_a_failing_filter_aborts_the_run(models, tmp_path, monkeypatch):
    from plugins.filters import NonFinite

    def broken(self, images, requests):
        raise RuntimeError("classifier weights missing")

    monkeypatch.setattr(NonFinite, "__call__", broken)
    result = CliRunner().invoke(cli, [
        "generate", "--model", str(models["uncond"]), "-n", "1", "--steps", "2",
        "--filter", "nonfinite", "--out", str(tmp_path / "out"), "-q",
    ])  # fmt: skip
    assert result.exit_code == 2
    assert "fail closed" in result.stderr
    assert not list((tmp_path / "out").rglob("*.png"))


def bad_inputs(models, tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    (corrupt / "scheduler_config.json").write_text("{}")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (pickled / "scheduler_config.json").write_text("{}")
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"x")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    uncond, cond = str(models["uncond"]), str(models["cond"])
    return {
        "missing model": (["--model", str(tmp_path / "nope")], "does not exist"),
        "not a model": (["--model", str(tmp_path)], "not a diffusers model folder"),
        "corrupt model": (["--model", str(corrupt)], "corrupt config"),
        "pickle": (["--model", str(pickled)], "--trust-pickle"),
        "unknown sampler": (["--model", uncond, "--sampler", "nope"], "Choose one of"),
        "unknown option": (["--model", uncond, "--schedule-option", "eta=1"], "accepted"),
        "bad value": (
            ["--model", uncond, "--sampler", "euler", "--sampler-option", "s_churn=lots"],
            "bad value",
        ),
        "not key=value": (["--model", uncond, "--sampler-option", "eta"], "KEY=VALUE"),
        "steps 0": (["--model", uncond, "--steps", "0"], "steps must be"),
        "unknown attribute": (["--model", cond, "--condition", "colour=red"], "no attribute"),
        "unknown value": (["--model", cond, "--condition", "digit=9"], "choose one of: 0, 1, 2"),
        "condition on uncond": (["--model", uncond, "--condition", "digit=1"], "unconditional"),
        "cfg on uncond": (["--model", uncond, "--guidance", "cfg"], "use --guidance none"),
        "unknown filter": (["--model", uncond, "--filter", "nope"], "unknown safety filter"),
        "bad shard": (["--model", uncond, "--shard", "2/2"], "0 <= K < N"),
        "unwritable out": (["--model", uncond, "--out", str(a_file / "sub")], "not writable"),
    }


CASES = [
    "missing model", "not a model", "corrupt model", "pickle", "unknown sampler",
    "unknown option", "bad value", "not key=value", "steps 0", "unknown attribute",
    "unknown value", "condition on uncond", "cfg on uncond", "unknown filter", "bad shard",
    "unwritable out",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_line_and_no_files(models, tmp_path, case):
    args, message = bad_inputs(models, tmp_path)[case]
    out = tmp_path / "out"
    if "--out" not in args:
        args = [*args, "--out", str(out)]
    result = CliRunner().invoke(cli, ["generate", *args, "-n", "1", "-q"])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def test_windows_do_not_change_what_a_run_writes(tmp_path, monkeypatch):
    """Sampling window by window (`toolkit.generation.run`) keeps every batch whole within a
    window and every sample its own: the same images with windows of 3 samples as with one."""
    from toolkit.generation import run as run_module

    settings = dict(conditions={"digit": "3"}, n=7, batch_size=2, steps=3, progress=False)
    toolkit.generate(out=tmp_path / "one", **settings)
    monkeypatch.setattr(run_module, "WINDOW_SAMPLES", 3)
    toolkit.generate(out=tmp_path / "windows", **settings)
    one, windows = (pandas.read_csv(tmp_path / name / "metadata.csv")
                    for name in ("one", "windows"))  # fmt: skip
    assert len(windows) == 7
    assert list(one.sort_values("index")["sha256"]) == list(windows.sort_values("index")["sha256"])
