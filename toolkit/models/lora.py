"""LoRA adapters on a model's networks, loaded by diffusers' own LoRA loading.

A request's LoRAs (``--lora PATH[:SCALE]``, repeatable; scale 1.0 by default) are checked
when the plan is made, without torch (`check_loras`): the family takes LoRAs (its
`ModelFolder.lora_pipeline`), each path is a file, a safetensors file whose header names
LoRA weights unless `trust_pickle` allows a pickled one, each scale is a finite number and
no file comes twice. Each file is hashed: run.json records its path, scale and sha256, and
they are part of the run's identity, so a folder is resumed only with the same LoRAs.

At load (`apply_loras`, called by the family's ``load`` with its networks) the networks are
handed to the LoRA mixin of the family's diffusers pipeline class (``StableDiffusionPipeline``,
``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``), whose
``load_lora_weights`` loads each file as one adapter into the networks it has weights for
(the denoiser, the text encoders; other trainers' key formats converted as the pipeline
converts them), and ``set_adapters`` combines the adapters with their scales: what
``pipe.load_lora_weights(path, adapter_name=...)`` and ``pipe.set_adapters(names,
adapter_weights=scales)`` do on the pipeline itself. diffusers' LoRA loading needs peft.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from toolkit.errors import DtkError

if TYPE_CHECKING:
    from toolkit.models.family import ModelFolder

#: the families that take LoRAs, as the refusal names them
TAKING = "Stable Diffusion 1.x/2.x (and LCM), SDXL, SD 3 and Flux folders"
SAFETENSORS = ".safetensors"
#: a safetensors header larger than this is not a LoRA's (diffusers' own limit is 100 MB)
MAX_HEADER = 100 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Lora:
    """One LoRA of a request: its file, scale and the file's sha256."""

    path: pathlib.Path
    scale: float
    sha256: str

    def describe(self) -> dict[str, Any]:
        """As run.json records it."""
        return {"path": str(self.path), "scale": self.scale, "sha256": self.sha256}


def parse_lora(entry: Any) -> tuple[pathlib.Path, Any]:
    """(path, scale) of a request's LoRA: ``"PATH[:SCALE]"``, a ``(path, scale)`` pair, a
    mapping with ``path`` and ``scale``, or a path (scale 1.0). The scale is checked by
    `check_loras`."""
    if isinstance(entry, Mapping):
        unknown = sorted(set(entry) - {"path", "scale"})
        if unknown or "path" not in entry:
            raise DtkError(f"a LoRA is {{'path': ..., 'scale': ...}}; got {dict(entry)!r}")
        return pathlib.Path(entry["path"]), entry.get("scale", 1.0)
    if isinstance(entry, (tuple, list)):
        if len(entry) != 2:
            raise DtkError(f"a LoRA is (path, scale); got {entry!r}")
        return pathlib.Path(entry[0]), entry[1]
    if isinstance(entry, os.PathLike):
        return pathlib.Path(entry), 1.0
    if not isinstance(entry, str) or not entry:
        raise DtkError(f"--lora {entry!r}: give PATH[:SCALE]")
    head, colon, tail = entry.rpartition(":")
    # a colon in the path itself (C:\\..., a file named so) is the path's when no scale follows
    if not colon or pathlib.Path(entry).exists() or "/" in tail or "\\" in tail:
        return pathlib.Path(entry), 1.0
    try:
        return pathlib.Path(head), float(tail)
    except ValueError:
        raise DtkError(f"--lora {entry}: the scale {tail!r} is not a number (give "
                       "PATH[:SCALE])") from None  # fmt: skip


def check_loras(entries: Sequence[Any], folder: ModelFolder, trust_pickle: bool = False
                ) -> list[Lora]:  # fmt: skip
    """A request's LoRAs checked against `folder` and hashed (see the module docstring), in
    order; no torch, no weights."""
    if isinstance(entries, (str, os.PathLike, Mapping)):
        entries = [entries]
    entries = list(entries or ())
    if not entries:
        return []
    if folder.lora_pipeline is None:
        raise DtkError(f"{folder.path}: a {folder.family} model takes no LoRA; --lora applies "
                       f"to {TAKING}")  # fmt: skip
    if importlib.util.find_spec("peft") is None:
        raise DtkError("--lora needs the peft package, diffusers' LoRA backend: pip install peft")
    loras: list[Lora] = []
    for entry in entries:
        path, scale = parse_lora(entry)
        scale = _scale(path, scale)
        if not path.is_file():
            missing = "is a folder, not a LoRA file" if path.is_dir() else "does not exist"
            raise DtkError(f"--lora {path} {missing}")
        if path.suffix.lower() == SAFETENSORS:
            _check_header(path)
        elif not trust_pickle:
            raise DtkError(f"--lora {path} is not a .safetensors file, and unpickling can run "
                           "arbitrary code; convert it to safetensors, or pass --trust-pickle "
                           "if you trust the source")  # fmt: skip
        lora = Lora(path.resolve(), scale, sha256(path))
        twin = next((other for other in loras if other.sha256 == lora.sha256), None)
        if twin is not None:
            raise DtkError(f"--lora {path}: the same file as {twin.path} is given twice; give it "
                           "once with the scale you want")  # fmt: skip
        loras.append(lora)
    return loras


def _scale(path: pathlib.Path, scale: Any) -> float:
    try:
        if isinstance(scale, bool):
            raise TypeError
        value = float(scale)
    except (TypeError, ValueError):
        raise DtkError(f"--lora {path}: the scale {scale!r} is not a number") from None
    if not math.isfinite(value):
        raise DtkError(f"--lora {path}: the scale {scale!r} is not a finite number")
    return value


def _check_header(path: pathlib.Path) -> None:
    """Refuse a file that is not safetensors, or holds no LoRA weights (diffusers' test:
    ``lora`` in the tensors' names), from its header alone."""
    try:
        with path.open("rb") as file:
            length = int.from_bytes(file.read(8), "little")
            if not 2 <= length <= min(MAX_HEADER, path.stat().st_size - 8):
                raise ValueError("bad header length")
            header = json.loads(file.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not an object")
    except OSError as exc:
        raise DtkError(f"--lora {path}: cannot read it: {exc.strerror}") from None
    except ValueError:
        raise DtkError(f"--lora {path} is not a safetensors file (its header does not "
                       "read)") from None  # fmt: skip
    names = [name for name in header if name != "__metadata__"]
    if not any("lora" in name.lower() for name in names):
        raise DtkError(f"--lora {path} holds no LoRA weights (none of its {len(names)} tensors "
                       "is named lora_...): is it a whole model rather than a LoRA?")  # fmt: skip


def sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def apply_loras(folder: ModelFolder, networks: Mapping[str, Any]) -> None:
    """Load `folder`'s LoRAs into `networks` (component name -> loaded module, as the
    pipeline names them: ``unet``/``transformer``, ``text_encoder``, ``text_encoder_2``;
    None for one the folder lacks) and combine them with their scales (see the module
    docstring). A file none of whose weights fit the networks is refused in one line."""
    loras = list(folder.loras)
    if not loras:
        return
    holder = _holder(str(folder.lora_pipeline), networks)
    names = []
    with _quiet_diffusers():
        for i, lora in enumerate(loras):
            name, safe = f"lora_{i}", lora.path.suffix.lower() == SAFETENSORS
            try:
                holder.load_lora_weights(str(lora.path.parent), weight_name=lora.path.name,
                                         adapter_name=name, local_files_only=True,
                                         use_safetensors=safe)  # fmt: skip
            except Exception as exc:  # loaders raise many types for a LoRA that does not fit
                why = f"{type(exc).__name__}: {_first_line(exc)}"
                raise DtkError(f"--lora {lora.path}: cannot load it into this {folder.family} "
                               f"model: {why}") from None  # fmt: skip
            if not any(name in adapters for adapters in holder.get_list_adapters().values()):
                raise DtkError(f"--lora {lora.path}: none of its weights fit this "
                               f"{folder.family} model's networks (a LoRA of another kind of "
                               "model?)")  # fmt: skip
            names.append(name)
        holder.set_adapters(names, adapter_weights=[lora.scale for lora in loras])


def _holder(pipeline: str, networks: Mapping[str, Any]) -> Any:
    """The pipeline class's LoRA mixin on an object holding just `networks`: what its
    ``load_lora_weights`` and ``set_adapters`` read of a pipeline (its components, no
    accelerate device map)."""
    import diffusers
    from diffusers.loaders.lora_base import LoraBaseMixin

    cls = getattr(diffusers, pipeline)
    mixin = next(c for c in cls.__mro__
                 if issubclass(c, LoraBaseMixin) and "load_lora_weights" in vars(c))  # fmt: skip

    class Holder(mixin):  # type: ignore[misc, valid-type]
        hf_device_map = None

        def __init__(self) -> None:
            for name, module in networks.items():
                setattr(self, name, module)

        @property
        def components(self) -> dict[str, Any]:
            return dict(networks)

    return Holder()


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Without diffusers' info and warning logs ("No LoRA keys associated to CLIPTextModel
    found" for a LoRA of the denoiser alone) and peft's warning that a network holds several
    adapters (which is what is asked for) on stderr."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Already found a `peft_config` attribute")
            yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _first_line(exc: BaseException) -> str:
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return first if len(first) <= 300 else first[:297] + "..."
