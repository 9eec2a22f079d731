"""`fair` and `sld` on top of another guider (``base=...``, ``base.KEY=VALUE``): the edit
is added to the base's combination, made in the base's own space, with every branch of
both in one forward pass (plugins/stacking.py, the guidance's ``base`` member).

The property that pins the composition down: the edit term depends on the branches'
estimates alone, so ``stacked(base=X) - X`` is the same for every base ``X``, step by step
(momentum and warmup included); and with the edit switched off the stacked guidance is its
base, to the pixel.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from folders import pixels
from tiny_sd import save_sd_pipeline, spy_forwards

import toolkit
from toolkit.models.family import Conditioning, NetworkModel
from toolkit.models.noise import NoiseLevels
from toolkit.models.parameterization import VP
from toolkit.sampling.denoiser import GuidedDenoiser

SHAPE = (2, 4, 8, 8)
SIGMAS = [14.6, 6.0, 2.5, 1.0, 0.4, 0.1]
SD_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
FAIR_TEXT = {"values": ["female", "male"], "warmup_steps": 0, "attribute": "gender"}
SLD_ON = {"preset": "medium", "warmup_steps": 0}
CAT = "a photo of a cat"
DDIM = dict(sampler="ddim", schedule="leading", schedule_options={"offset": 1}, progress=False)


class Branches(Conditioning):
    """Each branch's rows carry its own index: the model tells the branches apart by it."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def inputs(self, branch: str, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        index = self.ids.setdefault(branch, len(self.ids))
        return {"branch": torch.full((batch,), index)}


class BranchModel(NetworkModel):
    """An epsilon model whose output for branch k at step s is a fixed random tensor (the
    same for every guidance run, so runs can be compared step by step)."""

    def __init__(self, conditioning: Branches) -> None:
        levels = NoiseLevels.from_scheduler_config(SD_CONFIG)
        folder = types.SimpleNamespace(scheduler_config={})
        super().__init__(folder, torch.nn.Linear(1, 1), levels, VP(levels, "epsilon"))
        self.names = conditioning.ids
        self.step = 0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def conditioning(self, batch, text_branches) -> Conditioning:
        raise AssertionError("the tests build their conditioning themselves")

    def forward(self, x_in, t, branch):
        rows = []
        for index in branch.tolist():
            name = next(n for n, i in self.names.items() if i == index)
            seed = 1000 * self.step + sum(map(ord, name))
            rows.append(torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(seed)))
        return torch.stack(rows)


def trajectory(guidance) -> list[torch.Tensor]:
    """The guided estimates at SIGMAS, at one fixed x, through the toolkit's denoiser."""
    conditioning = Branches()
    model = BranchModel(conditioning)
    denoiser = GuidedDenoiser(model, guidance, conditioning)
    start = getattr(guidance, "start_batch", None)
    if start is not None:
        start([{"gender": "female"}, {"gender": "male"}])
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * 5
    out = []
    for step, sigma in enumerate(SIGMAS):
        model.step = step
        out.append(denoiser(x, sigma))
    return out


BASES = {"cfg": {}, "apg": {"base.eta": 0.0, "base.momentum": -0.5},
         "cfg_zero_star": {}, "tcfg": {}, "cfg_rescale": {"base.phi": 0.5}}  # fmt: skip


@pytest.mark.parametrize("editor", ["fair", "sld"])
@pytest.mark.parametrize("base", [b for b in BASES if b != "cfg"])
def test_the_edit_is_the_same_on_every_base(editor, base):
    """``stacked(base) - base`` equals ``stacked(cfg) - cfg`` at every step, and it is not
    zero: the edit moves the estimate, and only the base part changes with the base."""
    options = FAIR_TEXT if editor == "fair" else SLD_ON

    def edit(name: str, extra: dict) -> list[torch.Tensor]:
        stacked = trajectory(toolkit.guidance(editor, base=name, **options, **extra))
        base_options = {k.removeprefix("base."): v for k, v in extra.items()}
        alone = trajectory(toolkit.guidance(name, scale=7.5, **base_options))
        return [s - a for s, a in zip(stacked, alone)]

    reference = edit("cfg", {})
    for ours, theirs in zip(edit(base, BASES[base]), reference):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    assert max(float(e.abs().max()) for e in reference) > 1e-2


@pytest.mark.parametrize("editor", ["fair", "sld"])
def test_with_the_edit_off_the_stacked_guidance_is_its_base(editor):
    off = {**FAIR_TEXT, "edit_scale": 0.0} if editor == "fair" else {"guidance_scale": 0.0}
    stacked = trajectory(toolkit.guidance(editor, base="apg", **{"base.eta": 0.0}, **off))
    alone = trajectory(toolkit.guidance("apg", scale=7.5, eta=0.0))
    for ours, theirs in zip(stacked, alone):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_the_base_takes_the_editors_scale_unless_given():
    assert toolkit.guidance("sld", base="apg", scale=4.0).base.scale == 4.0
    assert toolkit.guidance("sld", base="apg", scale=4.0, **{"base.scale": 2.0}).base.scale == 2.0
    fair = toolkit.guidance("fair", base="tcfg", **FAIR_TEXT)
    assert fair.base.name == "tcfg" and fair.base.scale == 7.5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"base": "sld"}, "base 'sld' is itself an edit"),
        ({"base": "none"}, "no unconditional branch"),
        ({"base": "apg", "base.nonsense": 1}, "unknown option 'nonsense' for guidance 'apg'"),
        ({"base": "apg", "nonsense": 1}, "options of the base guidance are given as base.KEY"),
        ({"base": "no_such_guider"}, "no_such_guider"),
    ],
)
def test_bad_bases_are_one_line(options, message):
    with pytest.raises(toolkit.OptionError, match=message) as caught:
        toolkit.guidance("sld", **options)
    assert "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return save_sd_pipeline(tmp_path_factory.mktemp("stacking") / "sd")


def test_sld_on_pag_is_pag_and_its_safety_term_in_one_forward(sd, tmp_path, monkeypatch):
    """SLD switched off on a PAG base gives PAG's images to the pixel; switched on, every
    step is ONE UNet call holding cond, uncond, PAG's perturbed branch and the concept."""

    def run(name: str, guidance: str, options: dict) -> np.ndarray:
        toolkit.generate(sd, out=tmp_path / name, prompt=CAT, n=2, steps=4, guidance=guidance,
                         guidance_options=options, **DDIM)  # fmt: skip
        images = pixels(tmp_path / name)
        return np.stack([images[k] for k in sorted(images)])

    pag = run("pag", "pag", {"scale": 7.5, "pag_scale": 3.0})
    off = run("off", "sld", {"guidance_scale": 0.0, "base": "pag", "base.pag_scale": 3.0})
    assert np.array_equal(pag, off)

    _, unet_batches = spy_forwards(monkeypatch)
    on = run("on", "sld", {**SLD_ON, "base": "pag", "base.pag_scale": 3.0})
    assert unet_batches == [2 * 4] * 4
    assert not np.array_equal(on, pag)
    record = json.loads((tmp_path / "on" / "run.json").read_text())
    assert record["guidance"]["options"]["base"] == "pag"


def test_the_command_line_stacks_fair_on_apg(sd, tmp_path):
    from invoke import dtk

    out = tmp_path / "out"
    result = dtk("generate", "--model", str(sd), "--prompt", CAT, "-n", "2", "--steps", "3",
                 "--guidance", "fair", "--guidance-option", "values=female,male",
                 "--guidance-option", "attribute=gender", "--guidance-option", "base=apg",
                 "--guidance-option", "base.eta=0", "--guidance-option", "base.momentum=-0.5",
                 "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    options = json.loads((out / "run.json").read_text())["guidance"]["options"]
    assert options["base"] == "apg" and options["base.momentum"] in (-0.5, "-0.5")
