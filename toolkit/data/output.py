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

from toolkit.data import locking
from toolkit.data.paths import inside
from toolkit.errors import DtkError

if TYPE_CHECKING:
    import numpy as np
    import pandas

PARTS = pathlib.Path(".dtk") / "parts"
LOCKS = pathlib.Path(".dtk") / "locks"
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


class OutputFolder:
    """One run's output folder (see the module docstring).

    A run holds its part's lock (`hold`) from before it claims the folder until it has
    merged; claiming and merging also take the folder's lock, briefly, so two runs never
    interleave a read and a write of run.json or metadata.csv.
    """

    def __init__(self, root: str | pathlib.Path) -> None:
        self.root = pathlib.Path(root)
        self._claimed_new = False

    @property
    def run_file(self) -> pathlib.Path:
        return self.root / "run.json"

    def path(self, relative: str | pathlib.Path) -> pathlib.Path:
        """A file of this folder; refused if `relative` would lead outside it."""
        return inside(self.root, relative)

    def read_run(self) -> dict[str, Any] | None:
        if not self.run_file.is_file():
            return None
        try:
            run = json.loads(self.run_file.read_text())
        except ValueError as exc:
            raise DtkError(f"{self.run_file} is corrupt: {exc}") from None
        if not isinstance(run, dict):
            raise DtkError(
                f"{self.run_file} is not a dtk run record (a JSON object), but a "
                f"{type(run).__name__}"
            )
        return run

    # -- locks ---------------------------------------------------------------------------

    def _lock_file(self, name: str) -> pathlib.Path:
        return self.root / LOCKS / f"{name}.lock"

    @contextlib.contextmanager
    def hold(self, part: str, *, wait: bool = False) -> Iterator[None]:
        """Hold `part`'s lock for a run: a second run of the same part is refused (or, with
        `wait`, waits). If the run fails before any sample is recorded, what it created is
        removed again, so a failed command leaves no claimed folder behind."""
        existed = self.root.exists()
        created = [p for p in (self.root, *self.root.parents) if not p.exists()]
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            with locking.hold(self._lock_file(part), f"{self.root} ({part})", wait=wait):
                try:
                    yield
                except BaseException:
                    self._undo_claim(part, existed)
                    raise
        except BaseException:
            if not existed:
                _remove_empty_tree(self.root)
                for parent in created[1:]:
                    with contextlib.suppress(OSError):
                        parent.rmdir()
            raise

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        # held for milliseconds (a read and a write of run.json or metadata.csv): wait
        with locking.hold(self._lock_file("folder"), str(self.root), wait=True):
            yield

    def _undo_claim(self, part: str, existed: bool) -> None:
        with self._exclusive():
            if not self._claimed_new or self.records(strict=False):
                return
            if self._others_active(part):
                return
            with contextlib.suppress(OSError):
                self.run_file.unlink()
            self._claimed_new = False
        if not existed:
            with contextlib.suppress(OSError):
                for lock in (self.root / LOCKS).glob("*.lock"):
                    lock.unlink()

    def _others_active(self, part: str) -> bool:
        """Whether another run holds a part lock of this folder now."""
        for lock in (self.root / LOCKS).glob("*.lock"):
            if lock.stem in (part, "folder"):
                continue
            try:
                with locking.hold(lock, str(lock)):
                    pass
            except locking.FolderBusyError:
                return True
        return False

    def claim(self, run: Mapping[str, Any], identity_keys: tuple[str, ...]) -> None:
        """Record `run` in run.json; a folder holding a different run is refused.

        Runs are the same when their `identity_keys` agree; `n` may grow (a larger ``-n``
        extends the dataset).
        """
        text = json.dumps(run, indent=2, default=str) + "\n"
        # compare as stored: a path option and its string are the same run
        run = json.loads(text)
        with self._exclusive():
            existing = self.read_run()
            if existing is not None:
                differing = [k for k in identity_keys if existing.get(k) != run.get(k)]
                if differing:
                    raise DtkError(
                        f"{self.root} holds a different run (its {', '.join(differing)} "
                        "differ); choose another --out, or rerun the original command to "
                        "resume it"
                    )
                if existing.get("n", 0) >= run.get("n", 0):
                    return
            atomic_write(self.run_file, text.encode())
            self._claimed_new = self._claimed_new or existing is None

    # -- samples -------------------------------------------------------------------------

    def part_file(self, part: str) -> pathlib.Path:
        return self.root / PARTS / f"{part}.jsonl"

    def records(self, *, strict: bool = True) -> dict[int, dict[str, Any]]:
        """Finished samples by index, from every part log.

        A last line without its newline is a record a killed run did not finish: ignored.
        Any other line that is not a valid record is damage, refused with its file and
        line (`strict`), since merging around it would silently lose a sample.
        """
        records: dict[int, dict[str, Any]] = {}
        parts = self.root / PARTS
        if not parts.is_dir():
            return records
        for part in sorted(parts.glob("*.jsonl")):
            text = part.read_text(encoding="utf-8", errors="replace")
            lines = text.split("\n")[:-1]  # what follows the last newline is torn
            for number, line in enumerate(lines, 1):
                try:
                    record = _parse_record(line)
                except ValueError as exc:
                    if strict:
                        raise DtkError(f"{part}:{number}: damaged part log: {exc}") from None
                    continue
                records[record["index"]] = record
        return records

    def done(self) -> set[int]:
        """Indices whose sample is finished: recorded, and its image (if any) on disk."""
        return {
            index
            for index, record in self.records().items()
            if record["status"] not in WRITTEN or self.path(record["file_name"]).is_file()
        }

    @contextlib.contextmanager
    def part_writer(self, part: str) -> Iterator[PartWriter]:
        """Append to `part`'s log (the caller holds `part`'s lock)."""
        path = self.part_file(part)
        path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(path)
        with open(path, "a", encoding="utf-8") as handle:
            yield PartWriter(self, handle)

    # -- merging -------------------------------------------------------------------------

    def merge(self, columns_first: tuple[str, ...] = ("file_name",)) -> pandas.DataFrame:
        """Join the part logs into metadata.csv and rejected.csv; returns the metadata.

        Refused, with nothing changed, when the result would list fewer samples than the
        CSVs already do (a folder copied without its hidden ``.dtk/``, say).
        """
        import pandas

        with self._exclusive():
            by_index = self.records()
            records = [by_index[i] for i in sorted(by_index)]
            written = [r for r in records if r["status"] in WRITTEN]
            rejected = [r for r in records if r["status"] not in WRITTEN]
            self._check_nothing_lost("metadata.csv", "file_name", {r["file_name"] for r in written})
            self._check_nothing_lost("rejected.csv", "index", {str(r["index"]) for r in rejected})
            metadata = _frame(written, columns_first)
            atomic_write(self.root / "metadata.csv", metadata.to_csv(index=False).encode())
            rejected_frame = _frame(rejected, ("index",))
            if "file_name" in rejected_frame.columns:
                rejected_frame = rejected_frame.drop(columns="file_name")
            atomic_write(self.root / "rejected.csv", rejected_frame.to_csv(index=False).encode())
        return metadata if len(metadata.columns) else pandas.DataFrame(columns=["file_name"])

    def _check_nothing_lost(self, name: str, column: str, keep: set[str]) -> None:
        import pandas

        path = self.root / name
        if not path.is_file():
            return
        try:
            listed = pandas.read_csv(path, dtype=str, keep_default_na=False)
        except (ValueError, OSError):
            return  # unreadable: nothing in it can be lost
        if column not in listed.columns:
            return
        lost = sorted(set(listed[column]) - keep)
        if lost:
            raise DtkError(
                f"{path} lists {len(lost)} sample(s) that no part log in {self.root / PARTS} "
                f"records (e.g. {lost[0]!r}); merging would drop them, so nothing was "
                "changed (was the folder copied without its hidden .dtk folder?)"
            )


class PartWriter:
    """Writes images and appends their records to one part log."""

    def __init__(self, folder: OutputFolder, handle: Any) -> None:
        self.folder = folder
        self.handle = handle

    def write(self, record: dict[str, Any], pixels: np.ndarray | None) -> dict[str, Any]:
        """Write the image (if `pixels`), then log the record; the order makes resuming safe."""
        if pixels is not None:
            data = png_bytes(pixels)
            atomic_write(self.folder.path(record["file_name"]), data)
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


def _parse_record(line: str) -> dict[str, Any]:
    """One part-log line as a record; ValueError saying what is wrong with it."""
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object: {line[:60]!r}")
    index = record.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"'index' must be a whole number >= 0, got {index!r}")
    if not isinstance(record.get("status"), str):
        raise ValueError(f"'status' missing in the record of sample {index}")
    if record["status"] in WRITTEN and not isinstance(record.get("file_name"), str):
        raise ValueError(f"'file_name' missing in the record of sample {index}")
    return record


def _drop_torn_tail(path: pathlib.Path) -> None:
    """Cut a last line a killed run left without its newline, so the next record starts on
    a line of its own instead of gluing onto the fragment."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def _remove_empty_tree(root: pathlib.Path) -> None:
    """Remove `root` if it holds nothing but empty folders, lock files and empty part
    logs: what a run that recorded no sample leaves."""
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir():
            with contextlib.suppress(OSError):
                path.rmdir()
        elif (path.parent == root / LOCKS and path.suffix == ".lock") or (
            path.parent == root / PARTS and path.stat().st_size == 0
        ):
            with contextlib.suppress(OSError):
                path.unlink()
    with contextlib.suppress(OSError):
        root.rmdir()
