"""The generated-dataset folder: class subfolders of PNGs, metadata, resumable and shardable.

::

    OUT/run.json              the whole configuration (enough to redo the run)
    OUT/metadata.csv          one row per written image; ``file_name`` first
    OUT/rejected.csv          samples a safety filter withheld (``--on-flag drop``)
    OUT/<class>/<index>.png   the images
    OUT/.dtk/parts/*.jsonl    per-shard logs of finished samples, merged into the CSVs

Every file is written to a temporary name and renamed into place, so a killed run leaves
no half-written file. A sample counts as done once its record is in a part log (written
after its PNG); a rerun skips done samples and redoes the rest, so nothing is lost or
duplicated. Both ``datasets.load_dataset("imagefolder", data_dir=OUT)`` and torchvision's
``ImageFolder`` read the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pathlib
import tempfile
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from toolkit.errors import DtkError

if TYPE_CHECKING:
    import numpy as np
    import pandas

PARTS = pathlib.Path(".dtk") / "parts"
WRITTEN = ("ok", "tagged", "blank")  # statuses whose image is on disk


def _file_mode() -> int:
    # mkstemp makes 0600 files; a dataset should get the usual mode (0666 less the umask)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def atomic_write(path: pathlib.Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG of a ``[H, W, C]`` uint8 array (C = 1, 3 or 4)."""
    from PIL import Image

    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def check_writable(out: pathlib.Path) -> None:
    """Fail early, before any compute, if `out` cannot be created or written."""
    if out.exists() and not out.is_dir():
        raise DtkError(f"--out {out} exists and is not a folder")
    probe_parent = out if out.exists() else next((p for p in out.parents if p.exists()), None)
    if (
        probe_parent is None
        or not probe_parent.is_dir()
        or not os.access(probe_parent, os.W_OK | os.X_OK)
    ):
        raise DtkError(f"--out {out} is not writable")


class OutputFolder:
    """One run's output folder (see the module docstring)."""

    def __init__(self, root: str | pathlib.Path) -> None:
        self.root = pathlib.Path(root)

    @property
    def run_file(self) -> pathlib.Path:
        return self.root / "run.json"

    def read_run(self) -> dict[str, Any] | None:
        if not self.run_file.is_file():
            return None
        try:
            return json.loads(self.run_file.read_text())
        except ValueError as exc:
            raise DtkError(f"{self.run_file} is corrupt: {exc}") from None

    def claim(self, run: Mapping[str, Any], identity_keys: tuple[str, ...]) -> None:
        """Record `run` in run.json; a folder holding a different run is refused.

        Runs are the same when their `identity_keys` agree; `n` may grow (a larger ``-n``
        extends the dataset).
        """
        existing = self.read_run()
        text = json.dumps(run, indent=2, default=str) + "\n"
        # compare as stored: a path option and its string are the same run
        run = json.loads(text)
        if existing is not None:
            differing = [k for k in identity_keys if existing.get(k) != run.get(k)]
            if differing:
                raise DtkError(
                    f"{self.root} holds a different run (its {', '.join(differing)} differ); "
                    "choose another --out, or rerun the original command to resume it"
                )
            if existing.get("n", 0) >= run.get("n", 0):
                return
        atomic_write(self.run_file, text.encode())

    # -- samples -------------------------------------------------------------------------

    def part_file(self, part: str) -> pathlib.Path:
        return self.root / PARTS / f"{part}.jsonl"

    def records(self) -> dict[int, dict[str, Any]]:
        """Finished samples by index, from every part log (a torn last line is ignored)."""
        records: dict[int, dict[str, Any]] = {}
        parts = self.root / PARTS
        if not parts.is_dir():
            return records
        for part in sorted(parts.glob("*.jsonl")):
            for line in part.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a run killed mid-write
                records[int(record["index"])] = record
        return records

    def done(self) -> set[int]:
        """Indices whose sample is finished: recorded, and its image (if any) on disk."""
        return {
            index
            for index, record in self.records().items()
            if record["status"] not in WRITTEN or (self.root / record["file_name"]).is_file()
        }

    @contextlib.contextmanager
    def part_writer(self, part: str) -> Iterator[PartWriter]:
        path = self.part_file(part)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            yield PartWriter(self, handle)

    # -- merging -------------------------------------------------------------------------

    def merge(self, columns_first: tuple[str, ...] = ("file_name",)) -> pandas.DataFrame:
        """Join the part logs into metadata.csv and rejected.csv; returns the metadata."""
        import pandas

        by_index = self.records()
        records = [by_index[i] for i in sorted(by_index)]
        written = [r for r in records if r["status"] in WRITTEN]
        rejected = [r for r in records if r["status"] not in WRITTEN]
        metadata = _frame(written, columns_first)
        atomic_write(self.root / "metadata.csv", metadata.to_csv(index=False).encode())
        rejected_frame = _frame(rejected, ("index",))
        if "file_name" in rejected_frame.columns:
            rejected_frame = rejected_frame.drop(columns="file_name")
        atomic_write(self.root / "rejected.csv", rejected_frame.to_csv(index=False).encode())
        return metadata if len(metadata.columns) else pandas.DataFrame(columns=["file_name"])


class PartWriter:
    """Writes images and appends their records to one part log."""

    def __init__(self, folder: OutputFolder, handle: Any) -> None:
        self.folder = folder
        self.handle = handle

    def write(self, record: dict[str, Any], pixels: np.ndarray | None) -> dict[str, Any]:
        """Write the image (if `pixels`), then log the record; the order makes resuming safe."""
        if pixels is not None:
            data = png_bytes(pixels)
            atomic_write(self.folder.root / record["file_name"], data)
            record = {**record, "sha256": hashlib.sha256(data).hexdigest()}
        self.handle.write(json.dumps(record, default=str) + "\n")
        return record

    def flush(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())


def _frame(records: list[dict[str, Any]], first: tuple[str, ...]) -> pandas.DataFrame:
    import pandas

    frame = pandas.DataFrame.from_records(records)
    if frame.empty:
        return pandas.DataFrame(columns=list(first))
    ordered = [c for c in first if c in frame.columns]
    return frame[ordered + [c for c in frame.columns if c not in ordered]]
