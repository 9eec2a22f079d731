"""The generated-dataset folder: class subfolders of PNGs, metadata, resumable and shardable.

::

    OUT/run.json              the whole configuration (enough to redo the run)
    OUT/metadata.csv          one row per written image; ``file_name`` first
    OUT/rejected.csv          samples a safety filter withheld (``--on-flag drop``)
    OUT/<class>/<index>.png   the images
    OUT/.dtk/parts/*.jsonl    per-shard logs of finished samples, merged into the CSVs

Every file is written to a temporary name and renamed into place, so a killed run leaves
no half-written file. A sample counts as done once its record is in a part log, and a
record reaches its log only after its image is durable (`PartWriter`: once a batch, for the
whole batch); a rerun skips done samples and redoes the rest, so nothing is lost or
duplicated. Merging and resuming stream the logs: their memory does not grow with the
number of samples beyond a few bytes each. Both ``datasets.load_dataset("imagefolder",
data_dir=OUT)`` and torchvision's ``ImageFolder`` read the folder. The images may be in
WebDataset or Parquet shards instead of class folders (`toolkit.data.shards`): the logs,
CSVs and guarantees are the same, with the shard as the unit a kill costs.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import os
import pathlib
import random
import sys
import time
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import IO, TYPE_CHECKING, Any

from toolkit.data import csv_rows, locking
from toolkit.data.atomic import atomic_write, make_durable, replacing
from toolkit.data.images import encode_png
from toolkit.data.paths import inside
from toolkit.errors import DtkError

if TYPE_CHECKING:
    import numpy as np
    import pandas

PARTS = pathlib.Path(".dtk") / "parts"
LOCKS = pathlib.Path(".dtk") / "locks"
#: the lock files naming how runs divide the sample indices (`OutputFolder.hold`'s `split`)
SPLIT = "split-"
WRITTEN = ("ok", "tagged", "blank")  # statuses whose image is on disk


def _split_words(split: str) -> str:
    if split == "ray":
        return "Ray engine run"
    if split == "1":
        return "one-process run"
    return f"run in {split} shards (--shard K/{split}, or {split} torchrun ranks)"


def different_run(root: pathlib.Path, differing: list[str]) -> DtkError:
    """The refusal of a folder that holds a run with other `differing` identity keys."""
    return DtkError(f"{root} holds a different run (differing in {', '.join(differing)}); "
                    "choose another --out, or rerun the original command to resume it")  # fmt: skip


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
    def hold(self, part: str, *, wait: bool = False, split: str | None = None
             ) -> Iterator[None]:  # fmt: skip
        """Hold `part`'s lock for a run: a second run of the same part is refused (or, with
        `wait`, waits). If the run fails before any sample is recorded, what it created is
        removed again, so a failed command leaves no claimed folder behind.

        `split` is how the run divides the sample indices between its parts (`splitting`):
        runs that divide them otherwise would write the same samples, so one is refused
        while the other writes (or, with `wait`, waits)."""
        existed = self.root.exists()
        created = [p for p in (self.root, *self.root.parents) if not p.exists()]
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            with locking.hold(self._lock_file(part), f"{self.root} ({part})", wait=wait):
                try:
                    with self._splitting(split, wait):
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
    def _splitting(self, split: str | None, wait: bool) -> Iterator[None]:
        """Share `split`'s lock with the runs that divide the indices the same way (the
        parts of ``--shard K/N`` or of N torchrun ranks: ``N``; the Ray engine: ``ray``),
        once no run that divides them otherwise holds its own. A waiting run lets go of its
        own between looks (two kinds waiting on each other would wait for ever), after a
        random pause (so they do not keep looking at the same moments)."""
        if split is None:
            yield
            return
        told = False
        while True:
            with locking.share(self._lock_file(SPLIT + split)):
                others = [lock.stem[len(SPLIT):] for lock in self._split_locks(split)
                          if locking.in_use(lock)]  # fmt: skip
                if not others:
                    yield
                    return
            message = (f"{self.root} is being written by a {_split_words(others[0])}, which "
                       f"divides the samples differently from this {_split_words(split)}: "
                       "both would write the same samples")  # fmt: skip
            if not wait:
                raise locking.FolderBusyError(f"{message}; wait for it to finish, or rerun "
                                              "with --wait")  # fmt: skip
            if not told:
                print(f"dtk: waiting, {message}", file=sys.stderr)
                told = True
            time.sleep(random.uniform(0.5, 1.5))

    def _split_locks(self, split: str) -> list[pathlib.Path]:
        return [lock for lock in (self.root / LOCKS).glob(f"{SPLIT}*.lock")
                if lock.stem != SPLIT + split]  # fmt: skip

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        # held for milliseconds (a read and a write of run.json or metadata.csv): wait
        with locking.hold(self._lock_file("folder"), str(self.root), wait=True):
            yield

    def _undo_claim(self, part: str, existed: bool) -> None:
        # only the run that claimed the folder undoes the claim; any other (a Ray worker
        # whose process ends, say) leaves at once, without waiting on the folder's lock
        if not self._claimed_new:
            return
        with self._exclusive():
            if self._any_record():
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
            # a run's split lock goes with its part lock (and this run holds its own)
            if lock.stem in (part, "folder") or lock.stem.startswith(SPLIT):
                continue
            if locking.in_use(lock):
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
                    raise different_run(self.root, differing)
                if existing.get("n", 0) >= run.get("n", 0):
                    return
            atomic_write(self.run_file, text.encode())
            self._claimed_new = self._claimed_new or existing is None

    # -- samples -------------------------------------------------------------------------

    def part_file(self, part: str) -> pathlib.Path:
        return self.root / PARTS / f"{part}.jsonl"

    def records(self, *, strict: bool = True) -> dict[int, dict[str, Any]]:
        """Finished samples by index, from every part log (the last record of an index wins).

        It holds every record: for tests and small folders; a run streams the logs instead
        (`done`, `merge`). Damage is treated as `_logged` says.
        """
        return {record["index"]: record for _, _, record in self._logged(strict=strict)}

    def _parts(self) -> list[pathlib.Path]:
        parts = self.root / PARTS
        return sorted(parts.glob("*.jsonl")) if parts.is_dir() else []

    def _logged(self, *, strict: bool = True) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(part number in `_parts`, byte offset, record) of every line of the part logs, in
        order, one at a time.

        A last line without its newline is a record a killed run did not finish: ignored.
        Any other line that is not a valid record is damage, refused with its file and
        line (`strict`), since merging around it would silently lose a sample.
        """
        for number, part in enumerate(self._parts()):
            for line_number, offset, line in _complete_lines(part):
                try:
                    record = _parse_record(line[:-1].decode("utf-8", errors="replace"))
                except ValueError as exc:
                    if strict:
                        raise DtkError(f"{part}:{line_number}: damaged part log: {exc}") from None
                    continue
                yield number, offset, record

    def _any_record(self) -> bool:
        records = self._logged(strict=False)
        try:
            return next(records, None) is not None
        finally:
            records.close()

    def done(self, below: int | None = None) -> IndexSet:
        """Indices whose sample is finished: recorded, and its image (if any) on disk; only
        those `below` a bound when given (a run's `n`: the set takes a bit per index up to
        the largest)."""
        done, shards = IndexSet(), {}
        for _, _, record in self._logged():
            index = record["index"]
            finished = record["status"] not in WRITTEN or self.stored(record, shards)
            if below is None or index < below:
                done.put(index, finished)
        return done

    @contextlib.contextmanager
    def part_writer(self, part: str, fmt: str = "imagefolder", shard_size: int | None = None,
                    shard: str | None = None) -> Iterator[Any]:  # fmt: skip
        """Append to `part`'s log (the caller holds `part`'s lock), writing images in format
        `fmt` (`toolkit.data.shards`); what the caller wrote since its last ``flush`` is
        flushed when the block ends, not if it fails (those samples are redone). `shard`
        names the one shard every image goes to (`shards.ShardWriter`'s `name`)."""
        from toolkit.data import shards

        path = self.part_file(part)
        path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(path)
        with open(path, "a", encoding="utf-8") as handle:
            if fmt == "imagefolder":
                writer: Any = PartWriter(self, handle)
            else:
                writer = shards.ShardWriter(self, handle, part, fmt,
                                            shard_size or shards.SHARD_SIZE, shard)  # fmt: skip
            try:
                yield writer
            except BaseException:
                if fmt != "imagefolder":
                    writer.abandon()
                raise
            writer.close()

    def add_to_run(self, **fields: Any) -> None:
        """Add `fields` to run.json (what only the run learns, such as the sigmas a worker
        computed), atomically; its identity keys are not to be among them."""
        with self._exclusive():
            run = self.read_run() or {}
            text = json.dumps({**run, **fields}, indent=2, default=str) + "\n"
            atomic_write(self.run_file, text.encode())

    def stored(self, record: Mapping[str, Any], shards: dict[str, bool] | None = None) -> bool:
        """Whether a written record's image is on disk: its file, or the shard it names
        (`shards` caches which shards exist)."""
        shard = record.get("shard")
        if shard is None:
            return self.path(record["file_name"]).is_file()
        if shards is None:
            return self.path(shard).is_file()
        if shard not in shards:
            shards[shard] = self.path(shard).is_file()
        return shards[shard]

    # -- merging -------------------------------------------------------------------------

    def merge(self, columns_first: tuple[str, ...] = ("file_name",)) -> Merged:
        """Join the part logs into metadata.csv and rejected.csv; returns how many rows each
        has (the rows stay on disk: `metadata` reads them back).

        Streamed, in memory that grows by a few bytes per record, not by the record: one
        pass over the logs indexes the latest line of each sample (`_LogIndex`), a second
        writes the CSVs a row at a time in index order, each to a temporary file renamed
        into place. Refused, with nothing changed, when the result would list fewer samples
        than the CSVs already do (a folder copied without its hidden ``.dtk/``, say).
        """
        with self._exclusive():
            logs = _LogIndex.scan(self)
            written, rejected = logs.latest()
            self._check_nothing_lost("metadata.csv", "file_name", logs.keys(written))
            self._check_nothing_lost("rejected.csv", "index", logs.keys(rejected))
            _write_csv(self.root / "metadata.csv", logs.columns(written, columns_first),
                       logs.records(written))  # fmt: skip
            _write_csv(self.root / "rejected.csv",
                       logs.columns(rejected, ("index",), drop=("file_name",)),
                       logs.records(rejected))  # fmt: skip
        return Merged(images=len(written), rejected=len(rejected))

    def metadata(self, columns_first: tuple[str, ...] = ("file_name",)) -> pandas.DataFrame:
        """The records of every written image, in index order, as a DataFrame: the rows of
        metadata.csv with the records' own types (a label ``"3"`` stays a string, which
        reading the CSV back would not keep). It holds them all: `toolkit.generate` returns
        it; ``dtk generate`` does not build it."""
        import pandas

        with self._exclusive():
            logs = _LogIndex.scan(self)
            written, _ = logs.latest()
            records = list(logs.records(written))
        frame = pandas.DataFrame.from_records(records)
        if frame.empty:
            return pandas.DataFrame(columns=list(columns_first))
        ordered = [c for c in columns_first if c in frame.columns]
        return frame[ordered + [c for c in frame.columns if c not in ordered]]

    def _check_nothing_lost(self, name: str, column: str, keep: np.ndarray) -> None:
        """Refuse if the CSV `name` lists a value of `column` whose hash is not in `keep`
        (sorted), reading it a row at a time."""
        path = self.root / name
        if not path.is_file():
            return
        try:
            lost = _unlisted(path, column, keep)
        except (ValueError, OSError, csv.Error):
            return  # unreadable: nothing in it can be lost
        if lost is not None:
            count, example = lost
            raise DtkError(
                f"{path} lists {count} sample(s) that no part log in {self.root / PARTS} "
                f"records (e.g. {example!r}); merging would drop them, so nothing was "
                "changed (was the folder copied without its hidden .dtk folder?)"
            )


@dataclasses.dataclass(frozen=True)
class Merged:
    """What a merge wrote: rows of metadata.csv (`images`) and of rejected.csv."""

    images: int
    rejected: int

    @property
    def samples(self) -> int:
        """Samples recorded: every index the part logs hold."""
        return self.images + self.rejected


class PartWriter:
    """Writes a batch's images, then, once they are durable, appends their records to one
    part log.

    `write` renames each PNG into place without waiting for the disk and keeps its record;
    `flush` (once a batch) makes the batch's images durable at once (`make_durable`), then
    appends the records and fsyncs the log. So a record in a log always has its image on
    disk, after a SIGKILL, a crash or a power loss too: what such an end costs is the
    unfinished batch, whose images (whole after a kill; maybe not after a power loss) no
    record lists, and which a rerun writes again. One sync a batch instead of an fsync per
    image is what makes it cheaper.
    """

    def __init__(self, folder: OutputFolder, handle: Any) -> None:
        self.folder = folder
        self.handle = handle
        self._images: list[pathlib.Path] = []
        self._lines: list[str] = []

    def write(self, record: dict[str, Any], pixels: np.ndarray | None) -> dict[str, Any]:
        """Write the image (if `pixels`); the record is logged by the next `flush`."""
        if pixels is not None:
            data = encode_png(pixels)
            path = self.folder.path(record["file_name"])
            atomic_write(path, data, durable=False)
            self._images.append(path)
            record = {**record, "sha256": hashlib.sha256(data).hexdigest()}
        self._lines.append(json.dumps(record, default=str) + "\n")
        return record

    def close(self) -> None:
        """The end of the run: what is waiting is flushed."""
        self.flush()

    def flush(self) -> None:
        """Make the images written since the last flush durable, then log their records
        (and the records of samples without an image) durably, in that order."""
        make_durable(self._images)
        self._images.clear()
        if self._lines:
            self.handle.write("".join(self._lines))
            self._lines.clear()
            self.handle.flush()
            os.fsync(self.handle.fileno())


class IndexSet(AbstractSet):
    """A set of sample indices in a bit each (a resumed run of 10 million samples holds
    1.2 MB, not 10 million ints)."""

    def __init__(self) -> None:
        self._bits = bytearray()
        self._count = 0

    def put(self, index: int, member: bool = True) -> None:
        """Add `index` to the set, or (not `member`) take it out."""
        byte, bit = index >> 3, 1 << (index & 7)
        if byte >= len(self._bits):
            if not member:
                return
            self._bits.extend(bytes(max(byte + 1 - len(self._bits), len(self._bits))))
        if bool(self._bits[byte] & bit) != member:
            self._bits[byte] ^= bit
            self._count += 1 if member else -1

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int) or index < 0 or index >> 3 >= len(self._bits):
            return False
        return bool(self._bits[index >> 3] >> (index & 7) & 1)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        """The indices in increasing order, unpacked a chunk at a time."""
        import numpy as np

        chunk = 4096  # bytes: 32 Ki indices
        for start in range(0, len(self._bits), chunk):
            bits = np.frombuffer(bytes(self._bits[start : start + chunk]), dtype=np.uint8)
            found = np.flatnonzero(np.unpackbits(bits, bitorder="little")) + start * 8
            yield from found.tolist()

    @classmethod
    def _from_iterable(cls, iterable: Iterable[int]) -> frozenset[int]:
        # what the set operators (&, |, -) return: a plain set
        return frozenset(iterable)

    def __repr__(self) -> str:
        return f"IndexSet({len(self)} indices)"


class _LogIndex:
    """The first pass of a merge: for every complete line of the part logs, where it is
    (part, byte offset), its sample index, whether its image is written, the hash of what
    `_check_nothing_lost` compares, and its `csv_rows.Signature` (one of a few, stored
    once): 33 bytes a line, where the record itself takes about 3 KiB in memory."""

    def __init__(self, parts: list[pathlib.Path]) -> None:
        self.parts = parts
        self.index, self.part, self.offset = array("q"), array("i"), array("q")
        self.written, self.key, self.signature = array("b"), array("q"), array("i")
        self._signatures: dict[csv_rows.Signature, int] = {}

    @classmethod
    def scan(cls, folder: OutputFolder) -> _LogIndex:
        """Index `folder`'s part logs, refusing damage as `OutputFolder._logged` does."""
        logs, shards = cls(folder._parts()), {}
        for part, offset, record in folder._logged():
            written = record["status"] in WRITTEN
            if written and "shard" in record and not folder.stored(record, shards):
                continue  # logged, then killed before its shard was renamed: not done
            signature = csv_rows.signature(record)
            logs.index.append(record["index"])
            logs.part.append(part)
            logs.offset.append(offset)
            logs.written.append(written)
            # what the CSVs list: a file name (metadata.csv), an index (rejected.csv); as a
            # 64-bit hash, which takes a lost name for a kept one once in 2**64
            logs.key.append(hash(record["file_name"] if written else str(record["index"])))
            logs.signature.append(logs._signatures.setdefault(signature, len(logs._signatures)))
        return logs

    def _array(self, values: array, dtype: Any) -> np.ndarray:
        import numpy as np

        return np.frombuffer(values, dtype=dtype) if len(values) else np.zeros(0, dtype)

    def latest(self) -> tuple[np.ndarray, np.ndarray]:
        """The lines of the last record of each index (later lines win, as they were
        written later), in index order: those of written images, and the others."""
        import numpy as np

        index = self._array(self.index, np.int64)
        order = np.argsort(index, kind="stable")
        ordered = index[order]
        last = np.ones(len(order), dtype=bool)
        last[:-1] = ordered[1:] != ordered[:-1]
        del ordered  # each temporary goes as soon as it can: they are the merge's peak
        lines = order[last]
        del order, last
        written = self._array(self.written, np.int8)[lines].astype(bool)
        return lines[written], lines[~written]

    def keys(self, lines: np.ndarray) -> np.ndarray:
        """The hashes of what the CSVs list for `lines`, sorted."""
        import numpy as np

        keys = self._array(self.key, np.int64)[lines]
        keys.sort()
        return keys

    def columns(self, lines: np.ndarray, first: Sequence[str], drop: Sequence[str] = ()
                ) -> csv_rows.Columns:  # fmt: skip
        """The CSV columns of the records on `lines` (in their order)."""
        import numpy as np

        ids = self._array(self.signature, np.int32)[lines]
        distinct, at = np.unique(ids, return_index=True)
        signatures = list(self._signatures)
        ordered = [signatures[i] for i in distinct[np.argsort(at)].tolist()]
        return csv_rows.Columns(ordered, first, drop)

    def records(self, lines: np.ndarray) -> Iterator[dict[str, Any]]:
        """The records on `lines`, read back one at a time, a chunk of positions at a time;
        a few part logs open at once."""
        import numpy as np

        parts, offsets = self._array(self.part, np.int32), self._array(self.offset, np.int64)
        handles: collections.OrderedDict[int, IO[bytes]] = collections.OrderedDict()
        try:
            for start in range(0, len(lines), 4096):
                chunk = lines[start : start + 4096]
                for part, offset in zip(parts[chunk].tolist(), offsets[chunk].tolist()):
                    handle = handles.pop(part, None) or open(self.parts[part], "rb")  # noqa: SIM115
                    handles[part] = handle
                    if len(handles) > 32:
                        handles.popitem(last=False)[1].close()
                    # a seek within the buffer costs nothing: the lines of a part come
                    # mostly in order
                    handle.seek(offset)
                    yield json.loads(handle.readline().decode("utf-8", errors="replace"))
        finally:
            for handle in handles.values():
                handle.close()


def _write_csv(path: pathlib.Path, columns: csv_rows.Columns,
               records: Iterable[Mapping[str, Any]]) -> None:  # fmt: skip
    """`csv_rows.write` to a temporary file, fsynced and renamed to `path`."""
    with replacing(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        csv_rows.write(text, columns, records)
        text.flush()
        text.detach()


def _unlisted(path: pathlib.Path, column: str, keep: np.ndarray) -> tuple[int, str] | None:
    """How many distinct values of `column` of the CSV at `path` have a hash not in `keep`
    (sorted), and the least of them; None if none (or no such column). ValueError where
    pandas could not read the file either: a row longer than the header, no header."""
    import numpy as np

    lost, least = array("q"), None
    with open(path, encoding="utf-8-sig", newline="") as handle:
        rows = csv.reader(handle)
        header = next(rows, None)
        if header is None:
            raise ValueError(f"{path} is empty")
        if column not in header:
            return None
        at = header.index(column)
        while values := [_cell(row, at, len(header)) for row in itertools.islice(rows, 4096)
                         if row]:  # fmt: skip
            hashes = np.fromiter(map(hash, values), dtype=np.int64, count=len(values))
            place = np.minimum(np.searchsorted(keep, hashes), max(len(keep) - 1, 0))
            found = keep[place] == hashes if len(keep) else np.zeros(len(values), bool)
            for k in np.flatnonzero(~found).tolist():
                lost.append(int(hashes[k]))
                least = values[k] if least is None else min(least, values[k])
    if least is None:
        return None
    return len(np.unique(np.frombuffer(lost, dtype=np.int64))), least


def _cell(row: list[str], at: int, width: int) -> str:
    """`row`'s cell `at` (empty if the row is short, as pandas reads it)."""
    if len(row) > width:
        raise ValueError("a row longer than the header")
    return row[at] if at < len(row) else ""


def _complete_lines(path: pathlib.Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, line with its newline) of each line of a part log that
    ends in a newline: what follows the last one is torn."""
    offset = 0
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.endswith(b"\n"):
                return
            yield number, offset, line
            offset += len(line)


def _parse_record(line: str) -> dict[str, Any]:
    """One part-log line as a record; ValueError saying what is wrong with it."""
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object: {line[:60]!r}")
    index = record.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"'index' must be a whole number >= 0, got {index!r}")
    if index >= 2**63:
        raise ValueError(f"'index' must be below 2**63, got {index!r}")
    if not isinstance(record.get("status"), str):
        raise ValueError(f"'status' missing in the record of sample {index}")
    if record["status"] in WRITTEN and not isinstance(record.get("file_name"), str):
        raise ValueError(f"'file_name' missing in the record of sample {index}")
    return record


def _drop_torn_tail(path: pathlib.Path) -> None:
    """Cut a last line a killed run left without its newline, so the next record starts on
    a line of its own instead of gluing onto the fragment (reading the log from its end:
    not all of it)."""
    if not path.is_file():
        return
    with open(path, "r+b") as handle:
        end = position = handle.seek(0, os.SEEK_END)
        while position > 0:
            start = max(0, position - (1 << 16))
            handle.seek(start)
            newline = handle.read(position - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            position = start
        else:
            keep = 0
        if keep < end:
            handle.truncate(keep)


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
