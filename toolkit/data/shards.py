"""Sharded output formats: WebDataset tar shards and Parquet files, for millions of images.

A folder of ten million small PNGs is slow on every filesystem and object store; the
same images in shards of about a thousand are a few thousand files. Beside the one-file-
per-image ``imagefolder`` layout (`toolkit.data.output`), a generated dataset can be::

    OUT/train-<part>-000000.tar       webdataset: <key>.png and <key>.json per sample
    OUT/train-<part>-000000.parquet   parquet: an ``image`` column (bytes and path) and
                                      every metadata column, with datasets' features
    OUT/run.json, metadata.csv, rejected.csv, .dtk/   as for imagefolder

``<part>`` is the writing part (``main``, or the shard or torchrun rank), so parts never
write the same file. The ``train-`` prefix is what makes ``datasets.load_dataset
("webdataset" or "parquet", data_dir=OUT)`` take the shards and nothing else (its split
naming), untouched. A sample's key is its index, zero-padded.

Resuming keeps the imagefolder guarantees. A shard is filled in a hidden temporary file
and renamed into place when full (`shard_size` images or `MAX_SHARD_BYTES`) or when the
run ends. Its records are logged (fsynced) *before* the rename and name the shard, and a
record counts as done only once its shard exists, so a kill at any point leaves either
a finished shard whose samples are done or samples a rerun makes again. Shard numbers
continue past every number a record names, so a rerun never fills a shard whose name an
older record holds. What a kill costs is the shard being filled.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pathlib
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import IO, TYPE_CHECKING, Any

from toolkit.data.atomic import fsync_path, replacing
from toolkit.data.images import encode_png
from toolkit.errors import DtkError

if TYPE_CHECKING:
    import numpy as np

    from toolkit.data.output import OutputFolder

FORMATS = ("imagefolder", "webdataset", "parquet")
EXTENSIONS = {"webdataset": ".tar", "parquet": ".parquet"}
#: images per shard unless told (WebDataset's and datasets' usual size)
SHARD_SIZE = 1000
#: a shard closes at this many bytes of images even when it has fewer images
MAX_SHARD_BYTES = 1 << 30
#: parquet rows buffered before they are written as a row group
ROW_GROUP = 256
PREFIX = "train"


def check_format(name: str, shard_size: int | None = None) -> None:
    """Refuse an unknown format, a shard size below 1 or for an imagefolder, and parquet
    without pyarrow."""
    if name not in FORMATS:
        raise DtkError(f"unknown --format {name!r}; choose one of: {', '.join(FORMATS)}")
    if shard_size is not None and (not isinstance(shard_size, int) or shard_size < 1):
        raise DtkError(f"--shard-size must be a whole number >= 1, got {shard_size!r}")
    if shard_size is not None and name == "imagefolder":
        raise DtkError("--shard-size is for --format webdataset and parquet: an imagefolder "
                       "holds one file per image")  # fmt: skip
    if name == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise DtkError("--format parquet needs pyarrow: pip install pyarrow") from None


def shard_name(fmt: str, part: str, number: int) -> str:
    return f"{PREFIX}-{part}-{number:06d}{EXTENSIONS[fmt]}"


def key(index: int) -> str:
    """A sample's key inside a shard: its index, zero-padded (WebDataset keys hold no dot)."""
    return f"{index:09d}"


def _number(name: str, part: str) -> int | None:
    """The shard number in `name` if it is a shard of `part`."""
    match = re.fullmatch(rf"{PREFIX}-{re.escape(part)}-(\d+)\.(tar|parquet)", name)
    return int(match.group(1)) if match else None


class ShardSequence:
    """Images into shards of `fmt` in `root`: numbered ``train-<part>-NNNNNN`` from `first`,
    each closed at `shard_size` images or `MAX_SHARD_BYTES`, or all into the one shard
    `name`. `before_close(records)` runs before a closing shard is renamed into place."""

    def __init__(self, root: pathlib.Path, fmt: str, part: str, *, first: int = 0,
                 shard_size: int = SHARD_SIZE, name: str | None = None,
                 before_close: Callable[[list[dict[str, Any]]], None] | None = None,
                 ) -> None:  # fmt: skip
        self.root, self.fmt, self.part, self.shard_size = root, fmt, part, shard_size
        self.name, self._next, self._before_close = name, first, before_close
        self._open: _Shard | None = None

    def add(self, record: dict[str, Any], data: bytes) -> dict[str, Any]:
        """Add an image to the open shard (first closing it if full, opening one if none);
        returns `record` with the image's ``sha256`` and its ``shard``."""
        if self.full():
            self.close()
        if self._open is None:
            name = self.name or shard_name(self.fmt, self.part, self._next)
            self._next += self.name is None
            self._open = _SHARDS[self.fmt](self.root / name)
        record = {**record, "sha256": hashlib.sha256(data).hexdigest(), "shard": self._open.name}
        self._open.add(record, data)
        return record

    def full(self) -> bool:
        shard = self._open
        return (
            self.name is None
            and shard is not None
            and (len(shard.records) >= self.shard_size or shard.bytes >= MAX_SHARD_BYTES)
        )

    def close(self) -> None:
        """Close the open shard, if any: `before_close`, then into place, durably."""
        shard, self._open = self._open, None
        if shard is not None:
            if self._before_close is not None:
                self._before_close(shard.records)
            shard.finish()

    def discard(self) -> None:
        """The open shard's temporary file goes; its images were never there."""
        if self._open is not None:
            self._open.discard()
            self._open = None


class ShardWriter:
    """Writes one part's samples into shards of `fmt` and their records to its part log
    (the caller holds the part's lock); the `toolkit.data.output.PartWriter` interface.

    `write` adds an image to the open shard (records of samples without an image wait for
    the batch's `flush`); `flush` ends a batch: it logs those records and, when the open
    shard is full, closes it; `close` (the end of the run) closes a partly filled one.
    `name`: every image into this one shard, whatever its size (`toolkit.generation.
    ray_engine`: a shard named for its samples, so a retried batch writes the same shard).
    """

    def __init__(self, folder: OutputFolder, handle: Any, part: str, fmt: str,
                 shard_size: int = SHARD_SIZE, name: str | None = None) -> None:  # fmt: skip
        self.folder, self.handle, self.part = folder, handle, part
        self._lines: list[str] = []
        # numbering (a scan of the part log) only where shards are numbered, not per chunk
        first = 0
        if name is None:
            first = self._first_free_number()
            self._remove_leftovers()
        # records first, durably: a record whose shard never appears is simply not done
        self._shards = ShardSequence(
            folder.root, fmt, part, first=first, shard_size=shard_size, name=name,
            before_close=lambda records: self._log([_line(r) for r in records]),
        )  # fmt: skip

    def write(self, record: dict[str, Any], pixels: np.ndarray | None) -> dict[str, Any]:
        if pixels is None:  # refused, dropped or failed: a record and no image
            self._lines.append(_line(record))
            return record
        return self._shards.add(record, encode_png(pixels))

    def flush(self) -> None:
        self._log(self._lines)
        self._lines = []
        if self._shards.full():
            self._shards.close()

    def close(self) -> None:
        """The end of the run: log what is waiting and close the open shard."""
        self.flush()
        self._shards.close()

    def abandon(self) -> None:
        """A failed run: the open shard's temporary file goes; its samples are not done."""
        self._shards.discard()

    def _log(self, lines: list[str]) -> None:
        if lines:
            self.handle.write("".join(lines))
            self.handle.flush()
            os.fsync(self.handle.fileno())

    def _first_free_number(self) -> int:
        """One past every shard number of this part on disk or named by a record."""
        used = [n for n in (_number(p.name, self.part) for p in self.folder.root.iterdir())
                if n is not None]  # fmt: skip
        log = self.folder.part_file(self.part)
        if log.is_file():
            with open(log, encoding="utf-8", errors="replace") as lines:
                for line in lines:
                    found = re.search(r'"shard": "([^"]+)"', line)
                    number = _number(found.group(1), self.part) if found else None
                    if number is not None:
                        used.append(number)
        return max(used, default=-1) + 1

    def _remove_leftovers(self) -> None:
        """Temporary files of this part's shards that a killed run left behind."""
        pattern = re.compile(rf"\.{PREFIX}-{re.escape(self.part)}-\d+\.(tar|parquet)\..*\.tmp")
        for path in self.folder.root.iterdir():
            if pattern.fullmatch(path.name):
                with contextlib.suppress(OSError):
                    path.unlink()


def write_shards(
    root: pathlib.Path,
    fmt: str,
    samples: Iterable[tuple[dict[str, Any], bytes]],
    *,
    part: str = "main",
    shard_size: int | None = None,
) -> list[dict[str, Any]]:
    """Write `samples` (a record with a unique ``index`` and a ``file_name``, and its PNG
    bytes) into numbered shards of `fmt` in `root`, each renamed into place when complete;
    returns the records with their ``sha256`` and ``shard``. `shard_size` defaults to
    `SHARD_SIZE`. Shards of `part` that these do not replace are removed, so `root` holds
    exactly these samples (a dataset that is made again whole, such as `dtk synthesize`'s
    synthetic folder, not a resumable run)."""
    root.mkdir(parents=True, exist_ok=True)
    shards = ShardSequence(root, fmt, part, shard_size=shard_size or SHARD_SIZE)
    records = []
    try:
        for record, data in samples:
            records.append(shards.add(record, data))
        shards.close()
    except BaseException:
        shards.discard()
        raise
    kept = {r["shard"] for r in records}
    for path in root.iterdir():
        if _number(path.name, part) is not None and path.name not in kept:
            path.unlink()
    return records


def _line(record: Mapping[str, Any]) -> str:
    return json.dumps(record, default=str) + "\n"


class _Shard:
    """One shard being filled in a temporary file, renamed into place by `finish`."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path, self.name = path, path.name
        self.records: list[dict[str, Any]] = []
        self.bytes = 0
        self._replacing = replacing(path)
        self._handle: IO[bytes] = self._replacing.__enter__()

    def add(self, record: dict[str, Any], data: bytes) -> None:
        self.records.append(record)
        self.bytes += len(data)

    def finish(self) -> None:
        """Write what is buffered, fsync, rename into place and make the name durable."""
        self._replacing.__exit__(None, None, None)
        fsync_path(self.path.parent)

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self._replacing.__exit__(RuntimeError, RuntimeError("abandoned"), None)


class _TarShard(_Shard):
    """WebDataset: ``<key>.png`` and ``<key>.json`` (the sample's record) per sample,
    streamed into an uncompressed tar; members carry no time or owner, so the same samples
    give the same bytes."""

    def __init__(self, path: pathlib.Path) -> None:
        super().__init__(path)
        # open as long as the shard is: closed by `finish`
        self._tar = tarfile.open(fileobj=self._handle, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def add(self, record: dict[str, Any], data: bytes) -> None:
        super().add(record, data)
        stem = key(record["index"])
        meta = json.dumps(_shown(record), default=str, sort_keys=True).encode()
        for member, payload in ((f"{stem}.png", data), (f"{stem}.json", meta)):
            info = tarfile.TarInfo(member)
            info.size, info.mode = len(payload), 0o644
            self._tar.addfile(info, io.BytesIO(payload))

    def finish(self) -> None:
        self._tar.close()  # the end-of-archive blocks; the file stays open
        super().finish()


class _ParquetShard(_Shard):
    """Parquet: an ``image`` column (``bytes``, ``path``: datasets' Image) and every
    metadata column, written a row group at a time; the schema's ``huggingface`` metadata
    gives datasets the features, so ``image`` loads as an image."""

    def __init__(self, path: pathlib.Path) -> None:
        super().__init__(path)
        self._rows: list[tuple[dict[str, Any], bytes]] = []
        self._writer: Any = None
        self._kinds: dict[str, str] | None = None

    def add(self, record: dict[str, Any], data: bytes) -> None:
        super().add(record, data)
        self._rows.append((_shown(record), data))
        if len(self._rows) >= ROW_GROUP:
            self._write_rows()

    def finish(self) -> None:
        self._write_rows()
        if self._writer is not None:
            self._writer.close()
        super().finish()

    def _write_rows(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._rows:
            return
        if self._kinds is None:  # the first row group fixes the shard's schema
            self._kinds = {name: _kind(name, value) for name, value in self._rows[0][0].items()}
        schema = _schema(self._kinds)
        columns = {"image": [{"bytes": data, "path": r["file_name"]} for r, data in self._rows]}
        for name, kind in self._kinds.items():
            columns[name] = [_typed(kind, r.get(name)) for r, _ in self._rows]
        table = pa.Table.from_pydict(columns, schema=schema)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._handle, schema)
        self._writer.write_table(table)
        self._rows = []


_SHARDS = {"webdataset": _TarShard, "parquet": _ParquetShard}


def _shown(record: Mapping[str, Any]) -> dict[str, Any]:
    """What a shard stores of a record: everything but the shard's own name."""
    return {k: v for k, v in record.items() if k != "shard"}


def _kind(name: str, example: Any) -> str:
    """A metadata column's type: by its role where a value may be missing (filter flags
    booleans, filter scores floats, sample numbers integers), else by the first row's value
    (a run's common columns hold one value), text when in doubt."""
    if name in ("index", "seed"):
        return "int64"
    if name.startswith("filter_") and name.endswith("_flagged"):
        return "bool"
    if name.startswith("filter_") and name.endswith("_score"):
        return "float64"
    if isinstance(example, bool):
        return "bool"
    if isinstance(example, int):
        return "int64"
    if isinstance(example, float):
        return "float64"
    return "string"


def _typed(kind: str, value: Any) -> Any:
    if value is None:
        return None
    return {"int64": int, "bool": bool, "float64": float, "string": str}[kind](value)


def _schema(kinds: Mapping[str, str]) -> Any:
    import pyarrow as pa

    types = {"int64": pa.int64(), "bool": pa.bool_(), "float64": pa.float64(),
             "string": pa.string()}  # fmt: skip
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features: dict[str, Any] = {"image": {"_type": "Image"}}
    features.update({c: {"dtype": k, "_type": "Value"} for c, k in kinds.items()})
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    fields = [pa.field("image", image)] + [pa.field(c, types[k]) for c, k in kinds.items()]
    return pa.schema(fields, metadata=metadata)


# -- reading ---------------------------------------------------------------------------------


def shard_images(root: pathlib.Path, records: Sequence[Mapping[str, Any]]
                 ) -> Iterator[tuple[int, bytes]]:  # fmt: skip
    """``(position, PNG bytes)`` of each of `records` (each naming its ``shard`` and
    ``index``), a shard at a time: each shard is opened once, and only the images of the
    shard being read are held, whatever order the records come in."""
    by_shard: dict[str, dict[int, int]] = {}
    for position, record in enumerate(records):
        by_shard.setdefault(str(record["shard"]), {})[int(record["index"])] = position
    for name, positions in by_shard.items():
        path = root / name
        found: set[int] = set()
        try:
            for index, data in _read_shard(path, positions.keys()):
                yield positions[index], data
                found.add(index)
        except (OSError, tarfile.TarError, ValueError) as exc:
            raise DtkError(f"cannot read shard {path}: {exc}") from None
        if len(found) < len(positions):
            missing = min(positions.keys() - found)
            raise DtkError(f"{path} holds no image of sample {missing}")


def read_images(root: pathlib.Path, records: Sequence[Mapping[str, Any]]) -> list[bytes]:
    """The PNG bytes of `records` (each naming its shard), in their order: for a few
    records (a contact sheet's); `shard_images` streams."""
    found: list[bytes] = [b""] * len(records)
    for position, data in shard_images(root, records):
        found[position] = data
    return found


def _read_shard(path: pathlib.Path, indices: AbstractSet[int]) -> Iterator[tuple[int, bytes]]:
    """``(index, PNG bytes)`` of the samples of `indices` in the shard at `path`, read in
    the shard's order (a parquet shard a row group at a time)."""
    if path.suffix == ".tar":
        with tarfile.open(path) as tar:
            for member in tar:
                stem, _, suffix = member.name.partition(".")
                if suffix == "png" and stem.isdigit() and int(stem) in indices:
                    yield int(stem), tar.extractfile(member).read()  # type: ignore[union-attr]
        return
    import pyarrow.parquet as pq

    # a row group's indices first: the images of a group holding none are never read
    with pq.ParquetFile(path) as shard:
        for group in range(shard.num_row_groups):
            held = [int(i) for i in shard.read_row_group(group, columns=["index"])["index"]
                    .to_pylist()]  # fmt: skip
            if not any(i in indices for i in held):
                continue
            images = shard.read_row_group(group, columns=["image"])["image"].to_pylist()
            for index, image in zip(held, images):
                if index in indices:
                    yield index, image["bytes"]
