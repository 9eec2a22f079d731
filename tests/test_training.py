"""`dtk train` on a small dataset folder, and the settings it refuses before any work."""

from __future__ import annotations

import json

import numpy as np
import pandas
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from threads import torch_threads

from toolkit.cli import cli
from toolkit.errors import DtkError
from toolkit.generation.generate import generate
from toolkit.recipes.training import TrainConfig, train


@pytest.fixture(autouse=True)
def one_thread():
    """These networks are tiny: on a CPU shared with other jobs one thread is fastest."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        digit, group = str(i % 3), ("light", "dark")[i % 2]
        name = f"{digit}/{i:03d}.png"
        (root / digit).mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / name)
        # `shade` is missing for some images: it cannot be a label
        shade = "" if i % 5 == 0 else "pale"
        rows.append({"file_name": name, "digit": digit, "group": group, "shade": shade})
    pandas.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root


def train_args(data, out, *extra):
    return ["train", str(data), "--attribute", "digit", "--attribute", "group", "--out",
            str(out), "--batch-size", "4", "--channels", "8,16,16", "-q", *extra]  # fmt: skip


def test_train_writes_a_model_that_generate_loads(data, tmp_path):
    out = tmp_path / "model"
    result = CliRunner().invoke(cli, train_args(data, out, "--steps", "20"))
    assert result.exit_code == 0, result.output
    space = json.loads((out / "toolkit.json").read_text())
    assert [a["name"] for a in space["attributes"]] == ["digit", "group"]
    assert space["attributes"][0]["values"] == ["0", "1", "2"]
    assert space["attributes"][1]["values"] == ["dark", "light"]
    record = json.loads((out / "training.json").read_text())
    assert record["steps_done"] == 20 and record["config"]["seed"] == 0
    unet_config = json.loads((out / "unet" / "config.json").read_text())
    assert unet_config["num_class_embeds"] == 4 * 3  # (3 digits + unspecified) x (2 + 1)
    # the class embedding is additive over attributes: the digit=d minus digit=d' offset is
    # the same whatever the group (so a rare group composes with every digit)
    from safetensors.torch import load_file

    table = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")[
        "class_embedding.weight"
    ]

    def label(digit: int, group: int) -> int:  # product encoding, radices 4 and 3
        return digit + 4 * group

    for group in (1, 2):
        torch.testing.assert_close(
            table[label(0, group)] - table[label(2, group)], table[label(0, 0)] - table[label(2, 0)]
        )
    metadata = generate(out, out=tmp_path / "gen", conditions={"digit": "2"}, n=2, steps=3,
                        progress=False)  # fmt: skip
    assert list(metadata["digit"].astype(str)) == ["2", "2"]
    assert list(metadata["guidance"]) == ["cfg", "cfg"]  # the null label exists


def test_training_is_deterministic_and_resumable(data, tmp_path):
    runner = CliRunner()
    straight = tmp_path / "straight"
    assert runner.invoke(cli, train_args(data, straight, "--steps", "6")).exit_code == 0
    resumed = tmp_path / "resumed"
    first = runner.invoke(cli, train_args(data, resumed, "--steps", "3", "--checkpoint-every",
                                          "3"))  # fmt: skip
    assert first.exit_code == 0, first.output
    from safetensors.torch import load_file

    weights = "unet/diffusion_pytorch_model.safetensors"
    a = load_file(straight / weights)
    b = load_file(resumed / weights)
    assert any((a[k] - b[k]).abs().max() > 0 for k in a)  # 3 steps differ from 6
    # a longer budget: --resume continues from the checkpoint, as if never stopped
    again = runner.invoke(cli, train_args(data, resumed, "--steps", "6", "--resume"))
    assert again.exit_code == 0, again.output
    b = load_file(resumed / weights)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # other settings cannot resume that checkpoint
    other = runner.invoke(cli, train_args(data, resumed, "--steps", "9", "--lr", "1e-4",
                                          "--resume"))  # fmt: skip
    assert other.exit_code == 2 and "other settings" in other.stderr


def test_resume_continues_the_same_run(data, tmp_path):
    runner = CliRunner()
    out = tmp_path / "m"
    args = train_args(data, out, "--steps", "4", "--checkpoint-every", "2")
    assert runner.invoke(cli, args).exit_code == 0
    state = json.loads((tmp_path / "m.checkpoint" / "state.json").read_text())
    assert state["step"] == 4
    result = runner.invoke(cli, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "training.json").read_text())["steps_done"] == 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--attribute", "colour"], "no column 'colour'"),
        (["--steps", "0"], "--steps must be"),
        (["--channels", "8,x"], "comma-separated"),
        (["--resume"], "nothing to resume"),
    ],
)
def test_bad_input(data, tmp_path, extra, message):
    args = train_args(data, tmp_path / "m", *extra)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not (tmp_path / "m").exists()


def test_existing_output_is_not_overwritten(data, tmp_path):
    (tmp_path / "m").mkdir()
    result = CliRunner().invoke(cli, train_args(data, tmp_path / "m", "--steps", "1"))
    assert result.exit_code == 2 and "exists" in result.stderr


# -- hostile settings: one line, exit 2, nothing written, before any image is read ------------


def read_no_images(*args, **kwargs):
    raise AssertionError("images were read before the mistake was found")


@pytest.fixture
def no_images(monkeypatch):
    """Reading an image fails the test: the mistake must be found before that."""
    monkeypatch.setattr("toolkit.data.dataset_folder.read_images", read_no_images)


def refused(result, message, folder):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in folder.iterdir()) == []  # nothing written
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--channels", "32,64"], "--channels takes three widths"),
        (["--channels", "8,16,16,16"], "--channels takes three widths"),
        (["--channels", "32,64,63"], "multiple of 8 (GroupNorm splits it into 8 groups"),
        (["--channels", "0,16,16"], "positive multiple of 8"),
        (["--size", "0"], "--size must be a positive multiple of 4"),
        (["--size", "-4"], "--size must be a positive multiple of 4"),
        (["--lr", "-1"], "--lr must be a finite number > 0"),
        (["--lr", "0"], "--lr must be a finite number > 0"),
        (["--lr", "inf"], "--lr must be a finite number > 0"),
        (["--ema-decay", "5"], "--ema-decay must be in [0, 1), got 5.0"),
        (["--ema-decay", "-1"], "--ema-decay must be in [0, 1)"),
        (["--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
        (["--attribute", "digit"], "--attribute digit is given twice"),
        (["--max-minutes", "nan"], "--max-minutes must be a finite number > 0"),
        (["--checkpoint-every", "-1"], "--checkpoint-every must be a whole number >= 0"),
        (["--seed", "-1"], "--seed must be a whole number >= 0"),
        (["--seed", str(2**64)], "--seed 18446744073709551616 is too large"),
        (["--attribute", "shade"], "some images have no 'shade' value"),
    ],
)
def test_hostile_settings_are_refused_before_any_work(data, tmp_path, no_images, extra, message):
    args = train_args(data, tmp_path / "m", "--steps", "2", *extra)
    refused(CliRunner().invoke(cli, args), message, tmp_path)


def test_an_out_that_is_a_file_is_refused(data, tmp_path):
    (tmp_path / "file").write_text("mine")
    result = CliRunner().invoke(cli, train_args(data, tmp_path / "file", "--steps", "2"))
    assert result.exit_code == 2 and "--out" in result.stderr
    assert "exists and is not a folder" in result.stderr, result.stderr
    result = CliRunner().invoke(cli, train_args(data, tmp_path / "file" / "m", "--steps", "2"))
    assert result.exit_code == 2 and "is not writable" in result.stderr, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert (tmp_path / "file").read_text() == "mine"


def test_a_checkpoint_is_checked_before_any_image_is_read(data, tmp_path, monkeypatch):
    args = train_args(data, tmp_path / "m", "--steps", "2")
    assert CliRunner().invoke(cli, args).exit_code == 0
    monkeypatch.setattr("toolkit.data.dataset_folder.read_images", read_no_images)
    other = CliRunner().invoke(cli, [*args, "--lr", "1e-4", "--resume"])
    assert other.exit_code == 2 and "other settings" in other.stderr, other.output
    (tmp_path / "m.checkpoint" / "state.json").write_text("{not json")
    damaged = CliRunner().invoke(cli, [*args, "--resume"])
    assert damaged.exit_code == 2 and "Traceback" not in damaged.output
    assert "state.json is damaged" in damaged.stderr, damaged.output


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"ema_decay": 5.0}, "--ema-decay must be in [0, 1)"),
        ({"block_out_channels": (32, 64)}, "--channels takes three widths"),
        ({"block_out_channels": (8, 16, 12)}, "multiple of 8"),
        ({"size": 0}, "--size must be a positive multiple of 4"),
        ({"lr": -1.0}, "--lr must be a finite number > 0"),
        ({"attributes": ["digit", "digit"]}, "--attribute digit is given twice"),
        ({"steps": 2.5}, "--steps must be a whole number >= 1"),
        ({"warmup": -1}, "warmup must be a whole number >= 0"),
        ({"weight_decay": float("nan")}, "weight_decay must be a finite number >= 0"),
        ({"seed": 2**64}, "--seed 18446744073709551616 is too large"),
    ],
)
def test_python_callers_get_the_same_checks(data, tmp_path, no_images, settings, message):
    config = TrainConfig(**{"data": str(data), "attributes": ["digit"],
                            "out": str(tmp_path / "m"), "steps": 2, "batch_size": 4,
                            "block_out_channels": (8, 16, 16), **settings})  # fmt: skip
    with pytest.raises(DtkError) as caught:
        train(config, progress=False)
    assert message in str(caught.value)
    assert list(tmp_path.iterdir()) == []
