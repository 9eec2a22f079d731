"""Text encoders run once per distinct prompt, then leave the accelerator before sampling
(`toolkit.models.stable_diffusion.PromptEmbeddings`, docs/models.md "Text encoders").

No GPU is needed: the encoders' home device is made to look like an accelerator (``cuda``)
and every ``Module.to`` towards it is recorded and skipped, so the weights stay on the CPU
while the moves the toolkit asks for are checked, in order with the encoders' and the
transformer's forward passes.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel
from tiny_sd3 import save_sd3_pipeline
from transformers import CLIPTextModelWithProjection, T5EncoderModel

import toolkit
from toolkit.models import open_model
from toolkit.models.stable_diffusion import PromptEmbeddings
from toolkit.registry.protocols import SampleRequest
from toolkit.sampling.engine import sample_images

ACCELERATOR = torch.device("cuda")
ENCODERS = (CLIPTextModelWithProjection, T5EncoderModel)
CAT, DOG, RED_DOG, NEG = "a photo of a cat", "a dog", "a red dog", "blurry"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "sd3", t5=True)


@pytest.fixture
def events(monkeypatch):
    """What happened, in order: ("encode", class) for each encoder forward, ("denoise",) for
    each transformer forward, ("to", device type, class) for each encoder move."""
    log: list[tuple[str, ...]] = []
    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(self, ENCODERS) and isinstance(target, (str, torch.device)):
            log.append(("to", torch.device(target).type, type(self).__name__))
            if torch.device(target).type == ACCELERATOR.type:
                return self  # the weights stay on the CPU
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    for cls in ENCODERS:
        forward = cls.forward

        def spy(self, *args, _forward=forward, **kwargs):
            log.append(("encode", type(self).__name__))
            return _forward(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", spy)
    transformer_forward = SD3Transformer2DModel.forward

    def denoise(self, *args, **kwargs):
        log.append(("denoise",))
        return transformer_forward(self, *args, **kwargs)

    monkeypatch.setattr(SD3Transformer2DModel, "forward", denoise)
    # encoders loaded "on the accelerator": their home device is cuda
    init = PromptEmbeddings.__init__

    def on_accelerator(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.home = ACCELERATOR

    monkeypatch.setattr(PromptEmbeddings, "__init__", on_accelerator)
    return log


def moves(log, device_type):
    return [e[2] for e in log if e[0] == "to" and e[1] == device_type]


def test_every_prompt_is_encoded_then_the_encoders_leave_before_sampling(folder, tmp_path,
                                                                         events):  # fmt: skip
    """Per-sample prompts over two batches, with a negative prompt under CFG: every distinct
    prompt goes through each encoder once, all before the first transformer call; then each
    encoder moves to the CPU once and never comes back."""
    toolkit.generate(folder, out=tmp_path / "out", prompt=[CAT, DOG, CAT, RED_DOG],
                     negative_prompt=NEG, n=4, batch_size=2, steps=2, progress=False)  # fmt: skip
    # loading puts each encoder on its device first; then the run encodes
    first_encode = next(i for i, e in enumerate(events) if e[0] == "encode")
    first_denoise = events.index(("denoise",))
    before, during = events[first_encode:first_denoise], events[first_denoise:]
    # the distinct samples (CAT, DOG, RED_DOG, each with NEG) two at a time: CAT and DOG,
    # then NEG, then RED_DOG, one call each through each of the three encoders
    encodes = [e[1] for e in before if e[0] == "encode"]
    assert encodes.count("CLIPTextModelWithProjection") == 2 * 3
    assert encodes.count("T5EncoderModel") == 3
    assert not [e for e in during if e[0] in ("encode", "to")]
    assert moves(before, "cpu") == ["CLIPTextModelWithProjection"] * 2 + ["T5EncoderModel"]
    assert moves(events, ACCELERATOR.type) == []
    last_encode = max(i for i, e in enumerate(before) if e[0] == "encode")
    first_move = min(i for i, e in enumerate(before) if e[0] == "to")
    assert last_encode < first_move
    assert len([e for e in events if e == ("denoise",)]) == 2 * 2  # 2 batches x 2 steps


def test_a_prompt_not_yet_encoded_brings_the_encoders_back(folder, events):
    """Batch after batch (a caller of `sample_images`, a resumed run): a batch whose prompts
    are all encoded leaves the encoders where they are; a new prompt brings them back, and
    they leave again before sampling."""
    model = open_model(folder).load(device=torch.device("cpu"), dtype=torch.float32)
    sampler, guidance = toolkit.sampler("euler"), toolkit.guidance("cfg", scale=7.0)
    sigmas = toolkit.schedule("flow")(2, model.noise_levels)
    events.clear()  # loading's moves

    def batch(*prompts):
        return [SampleRequest(index=k, seed=k, conditions={}, prompt=p)
                for k, p in enumerate(prompts)]  # fmt: skip

    clips = ["CLIPTextModelWithProjection"] * 2 + ["T5EncoderModel"]
    sample_images(model, sampler, guidance, sigmas, batch(CAT))
    assert moves(events, "cpu") == clips and moves(events, ACCELERATOR.type) == []
    assert model.encoded == 2  # CAT and the empty prompt (CFG's uncond)
    events.clear()
    sample_images(model, sampler, guidance, sigmas, batch(CAT, CAT))
    assert [e for e in events if e[0] != "denoise"] == []  # all cached: no move, no encode
    events.clear()
    sample_images(model, sampler, guidance, sigmas, batch(DOG, CAT))
    assert moves(events, ACCELERATOR.type) == clips and moves(events, "cpu") == clips
    first_denoise = events.index(("denoise",))
    assert [e for e in events[first_denoise:] if e[0] != "denoise"] == []
    assert model.encoded == 3


def test_a_branch_the_guidance_does_not_use_is_not_encoded(folder, events):
    """Without CFG the unconditional branch's empty prompt is never encoded (as the
    pipelines skip it)."""
    model = open_model(folder).load(device=torch.device("cpu"), dtype=torch.float32)
    sigmas = toolkit.schedule("flow")(2, model.noise_levels)
    sample_images(model, toolkit.sampler("euler"), toolkit.guidance("none"), sigmas,
                  [SampleRequest(index=0, seed=0, conditions={}, prompt=CAT)])  # fmt: skip
    assert model.encoded == 1


def test_on_the_cpu_the_encoders_stay(folder, monkeypatch):
    """Without an accelerator there is nothing to free: no encoder moves."""
    calls = []
    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        if isinstance(self, ENCODERS):
            calls.append(type(self))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    model = open_model(folder).load(device=torch.device("cpu"), dtype=torch.float32)
    loaded = len(calls)  # loading puts each part on its device
    sigmas = toolkit.schedule("flow")(1, model.noise_levels)
    sample_images(model, toolkit.sampler("euler"), toolkit.guidance("none"), sigmas,
                  [SampleRequest(index=0, seed=0, conditions={}, prompt=CAT)])  # fmt: skip
    assert len(calls) == loaded and not model.prompts.released


def test_windows_bound_what_is_encoded_ahead(folder, tmp_path, events, monkeypatch):
    """A run is sampled window by window (at most WINDOW_PROMPTS distinct prompts encoded
    ahead): the encoders come back for a window's new prompts only, and leave before its
    first transformer call."""
    from toolkit.generation import run as run_module

    monkeypatch.setattr(run_module, "WINDOW_PROMPTS", 2)
    toolkit.generate(folder, out=tmp_path / "out", prompt=[CAT, DOG, RED_DOG, CAT], n=4,
                     batch_size=1, steps=1, guidance="none", progress=False)  # fmt: skip
    clips = ["CLIPTextModelWithProjection"] * 2 + ["T5EncoderModel"]
    first_encode = next(i for i, e in enumerate(events) if e[0] == "encode")
    run_events = events[first_encode:]
    # window 1: CAT and DOG, window 2: RED_DOG (CAT is kept): the encoders leave twice and
    # come back once, each of the three prompts through T5 once (batch_size 1 at a time)
    assert moves(run_events, "cpu") == clips * 2 and moves(run_events, ACCELERATOR.type) == clips
    assert [e[1] for e in run_events if e[0] == "encode"].count("T5EncoderModel") == 3
    returned = next(i for i, e in enumerate(run_events) if e[0] == "to" and e[1] == "cuda")
    second = run_events[returned:]
    assert second.index(("denoise",)) > max(i for i, e in enumerate(second) if e[0] == "to")
    assert len([e for e in run_events if e == ("denoise",)]) == 4


def test_kept_embeddings_are_bounded(monkeypatch):
    """The most recently used `capacity` prompts are kept; an evicted one is encoded again."""
    calls: list[list[str]] = []

    def encode(prompts):
        calls.append(list(prompts))
        return {"hidden": torch.stack([torch.full((2,), float(len(p))) for p in prompts])}

    monkeypatch.setattr(PromptEmbeddings, "capacity", 2)
    embeddings = PromptEmbeddings(encode)
    embeddings(["a", "bb"])
    embeddings(["a"])  # "a" is now the most recently used
    rows = embeddings(["ccc"])  # evicts "bb"
    assert rows["hidden"].tolist() == [[3.0, 3.0]]
    embeddings(["a", "bb"])
    assert calls == [["a", "bb"], ["ccc"], ["bb"]] and embeddings.encoded == 4
    # a call needing more prompts than the capacity keeps them all until it returns
    assert embeddings(["a", "bb", "ccc"])["hidden"].shape == (3, 2)
