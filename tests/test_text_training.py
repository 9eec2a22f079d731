"""`dtk train --caption`: the text-to-image recipe (`toolkit.recipes.text_model`).

What it trains must be what diffusers' ``StableDiffusion3Pipeline`` runs: the training
forward (captions through both encoders, T5's 256 zero tokens run as one) is compared with
the pipeline's own ``encode_prompt`` and transformer on the saved folder.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from diffusers import StableDiffusion3Pipeline
from threads import torch_threads

from toolkit.cli import cli
from toolkit.models.sd3 import T5_LENGTH
from toolkit.models.zero_tokens import FoldedZeros
from toolkit.recipes import text_model
from toolkit.recipes.colored_digits import write as write_digits

CAPTIONS = ["a handwritten seven", "a three on dark paper", "", "an unseen word: zebra!"]


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A captioned colored-digits folder, cut to 48 images."""
    root = tmp_path_factory.mktemp("text-data")
    metadata = write_digits(root, "train", 0.2, seed=0, captions=True)
    metadata.iloc[:48].to_csv(root / "metadata.csv", index=False)
    return root


def perturbed_network(tokenizer) -> text_model.TextNetwork:
    """A network whose zero-initialised layers (adaLN gates, output) are not zero, so every
    path counts in the comparison."""
    torch.manual_seed(0)
    network = text_model.TextNetwork(tokenizer, latent_side=8).eval()
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return network


def test_the_training_forward_is_the_pipelines(tmp_path):
    tokenizer = text_model.word_tokenizer(text_model.caption_words(CAPTIONS[:2]))
    network = perturbed_network(tokenizer)
    text_model.save_pipeline(tmp_path, network, text_model.build_vae(), tokenizer)
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path, text_encoder_3=None,
                                                    tokenizer_3=None)  # fmt: skip
    latents, sigmas = torch.randn(4, 4, 8, 8), torch.tensor([0.1, 0.4, 0.7, 0.95])
    with torch.no_grad():
        ours = network(latents, sigmas, text_model.tokenize(tokenizer, CAPTIONS))
        embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS, None, None,
                                                  do_classifier_free_guidance=False)  # fmt: skip
        assert embeds.shape[1] == text_model.MAX_LENGTH + T5_LENGTH
        theirs = pipe.transformer(
            hidden_states=latents, encoder_hidden_states=embeds, pooled_projections=pooled,
            timestep=sigmas * 1000,
        ).sample  # fmt: skip
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)


def test_zero_tokens_equal_their_copies_and_are_put_back():
    tokenizer = text_model.word_tokenizer(["seven"])
    transformer = perturbed_network(tokenizer).transformer
    before = dict(transformer.attn_processors)
    x, s = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 800.0])
    clip, pooled = torch.randn(2, 5, 128), torch.randn(2, 64)
    with torch.no_grad():
        copies = torch.cat([clip, torch.zeros(2, 7, 128)], dim=1)
        full = transformer(hidden_states=x, encoder_hidden_states=copies,
                           pooled_projections=pooled, timestep=s).sample  # fmt: skip
        with pytest.raises(RuntimeError), FoldedZeros(transformer, copies=7):
            raise RuntimeError
        assert dict(transformer.attn_processors) == before
        one = torch.cat([clip, torch.zeros(2, 1, 128)], dim=1)
        with FoldedZeros(transformer, copies=7):
            folded = transformer(hidden_states=x, encoder_hidden_states=one,
                                 pooled_projections=pooled, timestep=s).sample  # fmt: skip
        # one copy without the bias: the bias is what stands for the other six
        wrong = transformer(hidden_states=x, encoder_hidden_states=one,
                            pooled_projections=pooled, timestep=s).sample  # fmt: skip
    torch.testing.assert_close(folded, full, atol=1e-5, rtol=0)
    assert (wrong - full).abs().max() > 1e-3


def test_word_tokenizer_makes_caption_words_single_tokens():
    tokenizer = text_model.word_tokenizer(["handwritten", "seven"], max_length=8)
    ids = tokenizer("A Handwritten  seven").input_ids
    words = tokenizer.convert_ids_to_tokens(ids)
    assert words == [text_model.BOS, "a</w>", "handwritten</w>", "seven</w>", text_model.EOS]
    # an unknown word still tokenizes, letter by letter
    assert tokenizer.convert_ids_to_tokens(tokenizer("zebra").input_ids)[1:-1] == [
        "z", "e", "b", "r", "a</w>"]  # fmt: skip
    assert text_model.caption_words(["A seven, on dark paper", "a SEVEN"]) == [
        "a", "seven", "on", "dark", "paper"]  # fmt: skip


def train_args(data, out, *extra):
    return ["train", str(data), "--caption", "text", "--out", str(out), "--batch-size", "4",
            "--vae-steps", "3", "-q", *extra]  # fmt: skip


def test_train_writes_a_pipeline_diffusers_and_dtk_load(data, tmp_path):
    out = tmp_path / "model"
    result = CliRunner().invoke(cli, train_args(data, out, "--steps", "3"))
    assert result.exit_code == 0, result.output
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    vae = json.loads((out / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] > 0 and vae["shift_factor"] != 0.0609  # measured, not SD3's
    record = json.loads((out / "training.json").read_text())
    assert record["steps_done"] == 3 and record["config"]["caption"] == "text"
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    assert size < 20 * 2**20
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    assert pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("a handwritten seven").input_ids)[
        2] == "handwritten</w>"  # fmt: skip
    images = tmp_path / "images"
    args = ["generate", "--model", str(out), "--prompt", "a seven", "-n", "2", "--steps", "2",
            "--out", str(images), "-q"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert len(list(images.rglob("*.png"))) == 2


def test_a_resumed_text_run_continues_the_same_run(data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert CliRunner().invoke(cli, train_args(data, straight, "--steps", "4")).exit_code == 0
    assert CliRunner().invoke(cli, train_args(data, resumed, "--steps", "2")).exit_code == 0
    # the autoencoder is trained once: the resumed run takes it from the checkpoint
    assert (resumed.with_name("resumed.checkpoint") / "vae" / "config.json").is_file()
    result = CliRunner().invoke(cli, train_args(data, resumed, "--steps", "4", "--resume"))
    assert result.exit_code == 0, result.output
    for part in ("transformer/diffusion_pytorch_model", "text_encoder/model",
                 "vae/diffusion_pytorch_model"):  # fmt: skip
        a = (straight / f"{part}.safetensors").read_bytes()
        assert a == (resumed / f"{part}.safetensors").read_bytes(), part
    # the same configs too: nothing of where the checkpoint was leaks into the folder
    for part in ("vae", "transformer", "text_encoder"):
        config = (resumed / part / "config.json").read_text()
        assert config == (straight / part / "config.json").read_text(), part


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--attribute", "digit"], "give one or the other"),
        (["--vae-steps", "0"], "--vae-steps"),
    ],
)
def test_bad_text_settings_are_refused_in_one_line(data, tmp_path, extra, message):
    out = tmp_path / "model"
    result = CliRunner().invoke(cli, [*train_args(data, out, "--steps", "2"), *extra])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists() and not out.with_name("model.checkpoint").exists()


def test_a_missing_caption_column_is_refused(data, tmp_path):
    out = tmp_path / "model"
    args = train_args(data, out, "--steps", "2")
    args[args.index("text")] = "caption"
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "no column 'caption'" in result.output
    assert not out.exists()
