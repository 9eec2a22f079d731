"""`dtk train`: a diffusers model trained on a dataset folder, by one of two recipes.

* ``--attribute``: a class-conditional ``UNet2DModel``. Each attribute is dropped to
  "unspecified" independently with probability `p_drop` during training, so one model samples
  every subset of its attributes (and classifier-free guidance has its null label). Labels use
  the product encoding of `toolkit.conditions.labels`; epsilon prediction.
* ``--caption``: a text-to-image Stable Diffusion 3 pipeline (`toolkit.recipes.text_model`):
  an autoencoder first, then an MMDiT and two text encoders by rectified flow.

Both share the loop: AdamW with a short warm-up, an EMA of the weights (the shipped
weights), periodic checkpoints that `--resume` continues from, a wall-clock or step budget,
one fixed seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch  # this module is imported only to train

from toolkit.checks import check_fraction, check_positive, check_seed, check_writable
from toolkit.conditions.labels import Attribute, LabelSpace
from toolkit.data.dataset_folder import load_image_folder, read_metadata
from toolkit.data.output import atomic_write
from toolkit.errors import DtkError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
#: `build_unet` halves the image side twice (three resolutions)
DOWNSAMPLING = 4
#: GroupNorm splits every block width into this many groups, and attention heads are this
#: many channels wide (diffusers' default head size), so each width is a multiple of it
WIDTH_MULTIPLE = 8


@dataclasses.dataclass
class TrainConfig:
    data: str
    attributes: list[str]
    out: str
    #: the caption column: trains a text-to-image model (then no `attributes`)
    caption: str | None = None
    #: the text-to-image recipe's autoencoder steps, before the flow model's `steps`
    vae_steps: int = 3000
    steps: int | None = 2000
    max_minutes: float | None = None
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    ema_decay: float = 0.999
    p_drop: float = 0.15
    seed: int = 0
    size: int = 16
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    beta_schedule: str = "linear"
    num_train_timesteps: int = 1000
    checkpoint_every: int = 500

    def check(self) -> None:
        """Every setting a user can get wrong, refused with one line before any data is read
        or any file written (`train` calls it; so does ``dtk train``, through `train`)."""
        self._check_attributes()
        if self.steps is None and self.max_minutes is None:
            raise DtkError("give --steps or --max-minutes")
        if self.steps is not None:
            check_positive("--steps", self.steps)
        if self.max_minutes is not None:
            check_fraction("--max-minutes", self.max_minutes, high=math.inf, open_low=True)
        check_positive("--batch-size", self.batch_size)
        check_fraction("--lr", self.lr, high=math.inf, open_low=True)
        check_fraction("weight_decay", self.weight_decay, high=math.inf)
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise DtkError(f"warmup must be a whole number >= 0, got {self.warmup!r}")
        # the moving average keeps `ema_decay` of itself each step: 1 would never move
        check_fraction("--ema-decay", self.ema_decay, open_high=True)
        # with p_drop = 1 every label would be dropped: the model would learn no attribute
        check_fraction("--p-drop", self.p_drop, open_high=True)
        check_seed(self.seed, what="--seed")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise DtkError(f"--beta-schedule must be one of {', '.join(BETA_SCHEDULES)}")
        check_positive("num_train_timesteps", self.num_train_timesteps)
        every = self.checkpoint_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise DtkError(
                f"--checkpoint-every must be a whole number >= 0 (0: only at the end), "
                f"got {every!r}"
            )
        size = self.size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % DOWNSAMPLING:
            raise DtkError(
                f"--size must be a positive multiple of {DOWNSAMPLING} (the UNet halves the "
                f"image twice), got {size!r}"
            )
        self._check_channels()

    def _check_attributes(self) -> None:
        """At least one attribute, each a column name given once; or a caption column."""
        attributes = list(self.attributes)
        if self.caption is not None:
            if attributes:
                raise DtkError("--caption trains a text-to-image model, --attribute a "
                               "label-conditioned one: give one or the other")  # fmt: skip
            if not isinstance(self.caption, str) or not self.caption:
                raise DtkError(f"--caption must name a metadata column, got {self.caption!r}")
            check_positive("--vae-steps", self.vae_steps)
            return
        if not attributes:
            raise DtkError(
                "give --attribute (a metadata column to condition on) or --caption "
                "(a caption column, for a text-to-image model)"
            )
        for attribute in attributes:
            if not isinstance(attribute, str) or not attribute:
                raise DtkError(f"--attribute must name a metadata column, got {attribute!r}")
        twice = next((a for a in attributes if attributes.count(a) > 1), None)
        if twice is not None:
            raise DtkError(f"--attribute {twice} is given twice; name each attribute once")

    def _check_channels(self) -> None:
        channels = tuple(self.block_out_channels)
        shown = ",".join(str(c) for c in channels)
        if len(channels) != 3:
            raise DtkError(
                f"--channels takes three widths, one per resolution (e.g. 32,64,64), got "
                f"{len(channels)}: {shown!r}"
            )
        for width in channels:
            if (isinstance(width, bool) or not isinstance(width, int) or width < 1
                    or width % WIDTH_MULTIPLE):  # fmt: skip
                raise DtkError(
                    f"--channels {shown}: each width must be a positive multiple of "
                    f"{WIDTH_MULTIPLE} (GroupNorm splits it into {WIDTH_MULTIPLE} groups, and "
                    f"attention heads are {WIDTH_MULTIPLE} channels wide), got {width!r}"
                )


def build_unet(config: TrainConfig, num_labels: int) -> Any:
    """The default architecture: three resolutions, attention at the lowest (size / 4)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=config.size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=WIDTH_MULTIPLE,
        attention_head_dim=WIDTH_MULTIPLE,
        num_class_embeds=num_labels,
    )


class FactorizedEmbedding(torch.nn.Module):
    """Class embedding of a product-encoded label as a SUM of per-attribute embeddings.

    With one vector per (digit, group) combination, a rare combination (a minority group's
    "3") would be learned from its few images alone. Summing a digit vector and a group
    vector shares what the model learns about each attribute across all the others, so the
    minority style composes with every digit. For saving, `materialize` writes the sums of
    all combinations into the plain ``nn.Embedding`` a diffusers ``UNet2DModel`` has.
    """

    def __init__(self, space: LabelSpace, dim: int) -> None:
        super().__init__()
        self.radices = [a.radix for a in space.attributes]
        self.tables = torch.nn.ModuleList(torch.nn.Embedding(r, dim) for r in self.radices)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        total = 0
        for radix, table in zip(self.radices, self.tables):
            labels, index = labels.div(radix, rounding_mode="floor"), labels.remainder(radix)
            total = total + table(index)
        return total

    def materialize(self) -> torch.nn.Embedding:
        count = math.prod(self.radices)
        embedding = torch.nn.Embedding(count, self.tables[0].embedding_dim)
        with torch.no_grad():
            embedding.weight.copy_(self.forward(torch.arange(count)))
        return embedding


def label_space(dataset: Any, attributes: Sequence[str]) -> LabelSpace:
    _check_values(dataset.metadata, dataset.root, attributes)
    return LabelSpace(tuple(Attribute(a, tuple(dataset.values(a)), True) for a in attributes))


def _check_values(metadata: Any, root: Any, attributes: Sequence[str]) -> None:
    """Every image has a value of every attribute (a blank one would become a label)."""
    for attribute in attributes:
        if (metadata[attribute].astype(str) == "").any():
            raise DtkError(f"{root}: some images have no {attribute!r} value")


def _drop_labels(codes: torch.Tensor, space: LabelSpace, p: float, g: torch.Generator) -> Any:
    """Product-encoded labels with each attribute dropped to "unspecified" w.p. `p`."""
    label = torch.zeros(codes.shape[0], dtype=torch.long)
    stride = 1
    for k, attribute in enumerate(space.attributes):
        index = codes[:, k].clone()
        if p > 0:
            drop = torch.rand(codes.shape[0], generator=g) < p
            index[drop] = len(attribute.values)
        label += index * stride
        stride *= attribute.radix
    return label


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> pathlib.Path:
    """Train and write a model folder `config.out` that `dtk generate` loads."""
    # 1. Refuse every mistake before any image is read or file written.
    out, checkpoint, state = _check_request(config, resume)
    # 2. Read the images and their labels or captions (the text recipe: its autoencoder too,
    #    trained or taken from the checkpoint).
    recipe = _recipe(config, checkpoint, progress)
    # 3. Build the networks, seeded; a resumed run takes up its checkpoint's state.
    run = _Run.start(config, recipe)
    if state is not None:
        run.restore(checkpoint, state)
    # 4. Optimizer steps until the budget is spent, with periodic checkpoints.
    run.fit(checkpoint, progress=progress)
    # 5. The model folder: the EMA weights, what they are conditioned on, how they were made.
    _write_model(out, run)
    # 6. A last checkpoint, for a later --resume, unless step 4 has just written it.
    if not run.checkpoint_due():
        run.save_checkpoint(checkpoint)
    return out


def _check_request(
    config: TrainConfig, resume: bool
) -> tuple[pathlib.Path, pathlib.Path, dict[str, Any] | None]:
    """The model folder, its checkpoint folder and (with `resume`) the checkpoint's state,
    once the settings, both folders and the metadata have passed every check: a mistake
    costs one line, before any image is read or file written."""
    config.check()
    out = pathlib.Path(config.out)
    checkpoint = out.with_name(out.name + ".checkpoint")
    check_writable(out)
    check_writable(checkpoint)
    if resume and not (checkpoint / "state.json").is_file():
        raise DtkError(f"nothing to resume: no checkpoint at {checkpoint}")
    if not resume and (out.exists() or checkpoint.exists()):
        raise DtkError(f"--out {out} (or its checkpoint) exists; choose another or pass --resume")
    state = _read_state(checkpoint, config) if resume else None
    if config.caption is not None:
        read_metadata(config.data, [config.caption])
    else:
        metadata = read_metadata(config.data, config.attributes)
        _check_values(metadata, config.data, config.attributes)
    return out, checkpoint, state


class Recipe(Protocol):
    """What a kind of model brings to the shared loop: its data, its networks, its loss and
    the folder it writes."""

    def networks(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The trained network, fresh, and a twin for its moving average (the loop seeds
        before, and copies the first's weights into the second after)."""

    def loss(self, network: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        """The loss of one batch drawn from `g`."""

    def write(self, folder: pathlib.Path, ema: torch.nn.Module) -> None:
        """The model folder's files from the averaged weights, into the (empty) `folder`."""


def _recipe(config: TrainConfig, checkpoint: pathlib.Path, progress: bool) -> Recipe:
    if config.caption is not None:
        from toolkit.recipes.text_model import TextRecipe

        return TextRecipe.load(config, checkpoint, progress=progress)
    return LabelRecipe.load(config)


@dataclasses.dataclass
class LabelRecipe:
    """The class-conditional UNet: epsilon prediction under DDPM noise, labels dropped."""

    config: TrainConfig
    x_all: torch.Tensor  # [N, 3, size, size] in [-1, 1], the range the noise schedule assumes
    codes: torch.Tensor  # [N, A]: each image's value index per attribute
    space: LabelSpace
    scheduler: Any  # diffusers' DDPMScheduler: the noise levels

    @classmethod
    def load(cls, config: TrainConfig) -> LabelRecipe:
        """Read once, at the model's size; the label space has each attribute's values."""
        from diffusers import DDPMScheduler

        dataset = load_image_folder(config.data, config.attributes, size=config.size)
        space = label_space(dataset, config.attributes)
        codes = torch.stack([dataset.codes(a.name, a.values) for a in space.attributes], dim=1)
        scheduler = DDPMScheduler(
            num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule
        )
        return cls(config, dataset.images * 2 - 1, codes, space, scheduler)

    def networks(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """Two `build_unet` with a `FactorizedEmbedding` each, so that rare attribute
        combinations share what is learned. Both UNets are built before either embedding:
        the order of the draws that made the shipped weights."""
        pair = [build_unet(self.config, self.space.num_labels) for _ in range(2)]
        for unet in pair:
            width = unet.class_embedding.embedding_dim
            unet.class_embedding = FactorizedEmbedding(self.space, width)
        return pair[0], pair[1]

    def loss(self, network: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        x_t, t, labels, eps = self.noisy_batch(g)
        return torch.nn.functional.mse_loss(network(x_t, t, class_labels=labels).sample, eps)

    def noisy_batch(self, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Images noised to random timesteps: (noisy images, timesteps, labels, the noise).
        The draws from `g` come in a fixed order (images, label drops, timesteps, noise)
        that checkpoints, and the shipped weights, depend on."""
        config = self.config
        idx = torch.randint(0, len(self.x_all), (config.batch_size,), generator=g)
        x0 = self.x_all[idx]
        labels = _drop_labels(self.codes[idx], self.space, config.p_drop, g)
        t = torch.randint(0, config.num_train_timesteps, (config.batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = self.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        return x_t, t, labels, eps

    def write(self, folder: pathlib.Path, ema: torch.nn.Module) -> None:
        """A ``DDPMPipeline`` folder, the per-attribute label embeddings summed into the plain
        table diffusers has, and toolkit.json naming the attributes."""
        from diffusers import DDPMPipeline

        factorized = ema.class_embedding
        ema.class_embedding = factorized.materialize()
        try:
            DDPMPipeline(unet=ema, scheduler=self.scheduler).save_pretrained(folder)
        finally:
            ema.class_embedding = factorized
        (folder / "toolkit.json").write_text(json.dumps(self.space.to_json(), indent=2) + "\n")


@dataclasses.dataclass
class _Run:
    """One training run's moving parts: what a step changes and a checkpoint keeps.

    `g` alone draws the batches, label drops, timesteps and noise, so a run resumed from a
    checkpoint (which saves `g`'s state) continues exactly as if it had never stopped.
    """

    config: TrainConfig
    recipe: Recipe
    network: Any
    ema: Any  # the moving average of `network`'s weights: the weights the model folder gets
    optimizer: torch.optim.Optimizer
    g: torch.Generator
    step: int = 0
    elapsed: float = 0.0  # seconds spent before `fit` (in the runs a checkpoint continues)
    started: float = 0.0  # `time.monotonic()` at step 0, earlier runs counted
    losses: list[float] = dataclasses.field(default_factory=list)  # this process's steps

    @classmethod
    def start(cls, config: TrainConfig, recipe: Recipe) -> _Run:
        """Seeded from `config.seed`: the initial weights, then `g`."""
        torch.manual_seed(config.seed)
        g = torch.Generator().manual_seed(config.seed)
        network, ema = recipe.networks()
        ema.load_state_dict(network.state_dict())
        ema.requires_grad_(False)
        optimizer = torch.optim.AdamW(
            network.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        return cls(config, recipe, network, ema, optimizer, g)

    def restore(self, checkpoint: pathlib.Path, state: dict[str, Any]) -> None:
        """Weights, optimizer moments, `g`'s state and the step count from `checkpoint`."""
        from safetensors.torch import load_file

        self.network.load_state_dict(load_file(checkpoint / "model.safetensors"))
        self.ema.load_state_dict(load_file(checkpoint / "ema.safetensors"))
        self.optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
        self.g.set_state(torch.load(checkpoint / "rng.pt", weights_only=True))
        self.step, self.elapsed = state["step"], state["elapsed"]

    def fit(self, checkpoint: pathlib.Path, *, progress: bool) -> None:
        """Steps until `config.steps` are done or `config.max_minutes` have passed (earlier
        runs counted), with a checkpoint every `config.checkpoint_every` steps."""
        from tqdm.auto import tqdm

        config = self.config
        budget = None if config.max_minutes is None else config.max_minutes * 60
        bar = tqdm(total=config.steps, initial=self.step, desc="training", unit="step",
                   file=sys.stderr, disable=not progress)  # fmt: skip
        self.started = time.monotonic() - self.elapsed
        self.network.train()
        while (config.steps is None or self.step < config.steps) and (
            budget is None or self.seconds() < budget
        ):
            loss = self.optimizer_step()
            self.update_ema()
            self.step += 1
            self.losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{sum(self.losses[-50:]) / len(self.losses[-50:]):.4f}")
            if self.checkpoint_due():
                self.save_checkpoint(checkpoint)
        bar.close()

    def optimizer_step(self) -> float:
        """One AdamW step on the recipe's loss (returned): the rate warms up linearly over
        `config.warmup` steps, and the gradient norm is clipped to 1, so that the first steps
        of a fresh network do not throw it off."""
        lr = self.config.lr * min(1.0, (self.step + 1) / max(1, self.config.warmup))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.recipe.loss(self.network, self.g)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 1.0)
        self.optimizer.step()
        return loss.item()

    def update_ema(self) -> None:
        """Move the EMA towards the new weights. Its decay ramps up to `config.ema_decay`
        over the first steps, so that the average soon forgets the random initial weights."""
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.network.parameters()):
                p_ema.lerp_(p, 1 - decay)

    def seconds(self) -> float:
        """Training time so far, earlier runs counted."""
        return time.monotonic() - self.started

    def checkpoint_due(self) -> bool:
        """Whether a checkpoint falls on the current step."""
        every = self.config.checkpoint_every
        return bool(every and self.step % every == 0)

    def save_checkpoint(self, checkpoint: pathlib.Path) -> None:
        """Everything `restore` needs to continue this run exactly (see `_save_checkpoint`)."""
        _save_checkpoint(checkpoint, self.network, self.ema, self.optimizer, self.g, self.step,
                         self.seconds(), self.config)  # fmt: skip


def _write_model(out: pathlib.Path, run: _Run) -> None:
    """The model folder `dtk generate` loads: the recipe's files from the EMA weights, and
    training.json. Written beside `out` and renamed into it, so that a failure never leaves
    half a model there."""
    run.ema.eval()
    with _writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        try:
            run.recipe.write(staging, run.ema)
            (staging / "training.json").write_text(json.dumps(_record(run), indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out)
            os.replace(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _record(run: _Run) -> dict[str, Any]:
    """training.json: the command and settings that made the model, and how far it got."""
    losses = run.losses
    return {
        "command": "dtk train " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["train"] else None,
        "config": _jsonable(run.config),
        "steps_done": run.step,
        "minutes": round(run.seconds() / 60, 2),
        "final_loss": sum(losses[-100:]) / max(1, len(losses[-100:])) if losses else None,
        "parameters": sum(p.numel() for p in run.ema.parameters()),
    }


def _read_state(checkpoint: pathlib.Path, config: TrainConfig) -> dict[str, Any]:
    """The checkpoint's ``state.json``, refused if damaged or made with other settings."""
    try:
        state = json.loads((checkpoint / "state.json").read_text())
        made_with = dict(state["config"])
        state["step"], state["elapsed"] = int(state["step"]), float(state["elapsed"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DtkError(f"{checkpoint}/state.json is damaged ({exc}); cannot --resume it") from None
    if _identity(made_with) != _identity(_jsonable(config)):
        raise DtkError(f"{checkpoint} was made with other settings; cannot --resume it")
    return state


@contextlib.contextmanager
def _writing(path: pathlib.Path) -> Iterator[None]:
    """An OSError while writing `path` (a full disk, a folder `check_writable` could not
    foresee) comes from the user's environment: one line, not a traceback."""
    try:
        yield
    except OSError as exc:
        raise DtkError(f"cannot write {path}: {exc}") from None


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must share (the budget may grow)."""
    return {
        k: v for k, v in config.items() if k not in ("steps", "max_minutes", "checkpoint_every")
    }


def _jsonable(config: TrainConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    data["block_out_channels"] = list(config.block_out_channels)
    return data


def _save_checkpoint(
    folder: pathlib.Path,
    network: Any,
    ema: Any,
    optimizer: Any,
    g: torch.Generator,
    step: int,
    elapsed: float,
    config: TrainConfig,
) -> None:
    import io

    from safetensors.torch import save

    def tensor_bytes(obj: Any) -> bytes:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return buffer.getvalue()

    state = {"step": step, "elapsed": elapsed, "config": _jsonable(config)}
    with _writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "model.safetensors", save(network.state_dict()))
        atomic_write(folder / "ema.safetensors", save(ema.state_dict()))
        atomic_write(folder / "optimizer.pt", tensor_bytes(optimizer.state_dict()))
        atomic_write(folder / "rng.pt", tensor_bytes(g.get_state()))
        atomic_write(folder / "state.json", (json.dumps(state, indent=2) + "\n").encode())
