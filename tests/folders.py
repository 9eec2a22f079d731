"""Folders in tests: reading generated images back, comparing them, copying part of a
folder, writing a prompts file, damaging a model folder's config and checking the refusal."""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pandas
from PIL import Image


def pixels(out: pathlib.Path, metadata: pandas.DataFrame | None = None) -> dict[int, np.ndarray]:
    """Each written image of folder `out` by sample index, as int16 so differences of two
    images do not wrap around; `metadata` defaults to the folder's metadata.csv."""
    if metadata is None:
        metadata = pandas.read_csv(out / "metadata.csv", keep_default_na=False)
    return {
        int(row.index): np.asarray(Image.open(out / row.file_name), dtype=np.int16)
        for row in metadata.itertuples()
    }


def copy_subset(
    source: pathlib.Path, metadata: pandas.DataFrame, out: pathlib.Path
) -> pathlib.Path:
    """A dataset folder `out` holding the images of `source` that `metadata` lists, with
    `metadata` as its metadata.csv."""
    for name in metadata["file_name"]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes((source / name).read_bytes())
    metadata.to_csv(out / "metadata.csv", index=False)
    return out


def max_pixel_difference(ours, theirs) -> int:
    """The largest difference, in pixel levels, between two runs' images of the same samples
    (sequences or dicts by sample index ``0 .. len(theirs) - 1``, as int16)."""
    return max(int(np.abs(ours[i] - theirs[i]).max()) for i in range(len(theirs)))


def prompts_file(directory: pathlib.Path, *prompts: str, negative: str | None = None
                 ) -> pathlib.Path:  # fmt: skip
    """A ``--prompts-file`` CSV in `directory`: a row per prompt, every row with `negative`
    as its negative prompt when given (no negative_prompt column otherwise)."""
    header = "prompt" if negative is None else "prompt,negative_prompt"
    rows = [p if negative is None else f"{p},{negative}" for p in prompts]
    path = directory / "prompts.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def edit_json(path: pathlib.Path, **changes: object) -> None:
    """Change keys of the JSON file at `path` (a model folder's config)."""
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def assert_damaged_copy_refused(source: pathlib.Path, tmp_path: pathlib.Path, damage, message: str,
                                *request: object) -> None:  # fmt: skip
    """A copy of model folder `source` damaged by ``damage(folder)``: ``dtk generate`` with
    `request` (its conditions or prompt) ends in exit 2 and one line holding `message`,
    before any weights load, and writes no output folder."""
    from invoke import dtk

    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    damage(folder)
    out = tmp_path / "out"
    result = dtk("generate", "--model", folder, *request, "-n", 1, "--out", out)
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert message in line, line
    assert not out.exists()


def capture_decoded(monkeypatch, *families) -> list:
    """The clean samples (latents) each run of `families` decodes, appended in order: what
    a test compares with a reference pipeline's latents."""
    decoded: list = []
    for family in families:
        monkeypatch.setattr(family, "decode", lambda model, x, decode=family.decode:
                            decoded.append(x.clone()) or decode(model, x))  # fmt: skip
    return decoded


def save_family(family: str, path: pathlib.Path) -> pathlib.Path:
    """A tiny random pipeline folder of `family` (``sd``, ``sdxl``, ``sd3``, ``flux``,
    ``pixart``, ``lcm``, ``dit``), saved with the family's own pipeline class."""
    from tiny_dit import save_dit_pipeline
    from tiny_flux import save_flux_pipeline
    from tiny_lcm import save_lcm_pipeline
    from tiny_pixart import save_pixart_pipeline
    from tiny_sd import save_sd_pipeline
    from tiny_sd3 import save_sd3_pipeline
    from tiny_sdxl import save_sdxl_pipeline

    return {"sd": save_sd_pipeline, "sdxl": save_sdxl_pipeline, "sd3": save_sd3_pipeline,
            "flux": save_flux_pipeline, "pixart": save_pixart_pipeline,
            "lcm": save_lcm_pipeline, "dit": save_dit_pipeline}[family](path)  # fmt: skip


def made_once(root: pathlib.Path, save: Callable[[str, pathlib.Path], Any] = save_family
              ) -> Callable[[str], Any]:  # fmt: skip
    """``folder(name)``: ``save(name, root / name)`` the first time `name` is asked for, the
    same folder after that; a module's fixture builds only the folders its tests use."""
    made: dict[str, Any] = {}

    def folder(name: str) -> Any:
        if name not in made:
            made[name] = save(name, root / name)
        return made[name]

    return folder


def raw_shard_images(paths: Iterable[pathlib.Path]) -> dict[int, bytes]:
    """index -> PNG bytes of the WebDataset or Parquet shards at `paths`, read straight out
    of the files (no dtk code); a sample found twice fails."""
    import tarfile

    import pyarrow.parquet as pq

    found: dict[int, bytes] = {}

    def add(index: int, data: bytes) -> None:
        assert index not in found, f"sample {index} twice"
        found[index] = data

    for path in paths:
        if path.suffix == ".tar":
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".png"):
                        add(int(member.name.split(".")[0]), tar.extractfile(member).read())
        else:
            for row in pq.read_table(path, columns=["image", "index"]).to_pylist():
                add(row["index"], row["image"]["bytes"])
    return found
