"""`dtk train` on a small dataset folder."""

from __future__ import annotations

import json

import numpy as np
import pandas
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from toolkit.cli import cli
from toolkit.generation import generate


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
        rows.append({"file_name": name, "digit": digit, "group": group})
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
