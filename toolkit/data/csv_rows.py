"""CSV text exactly as pandas writes ``DataFrame.from_records(records).to_csv(index=False)``,
written a record at a time: the output folder's metadata.csv and rejected.csv are merged
from part logs of any length, in memory that does not grow with them (pandas would hold
every record at once, and takes 0.2 s to import).

What the text depends on, as pandas does it: the columns are the records' keys in order of
first appearance, a record without a key having an empty cell; a cell is its value's
``str`` (a float's ``repr``), empty for None and NaN; and one mix of values converts: a
column holding integers (all within int64, or all non-negative within uint64), with floats
or empty cells and nothing else, is a float column, whose integers read ``3.0``.
tests/test_output_streaming.py compares the bytes with pandas' on every mix of kinds.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

#: a value's kind, as far as its column's text depends on it: empty (None, NaN or no key),
#: an integer within int64 (>= 0 or < 0) or only within uint64, a float, anything else
NULL, POS, NEG, UINT, FLOAT, OTHER = "n", "p", "m", "u", "f", "o"
_NUMERIC = frozenset({NULL, POS, NEG, UINT, FLOAT})

#: a record's keys and its values' kinds: all its columns' text depends on besides the
#: values themselves (the records of a run share a few)
Signature = tuple[tuple[str, ...], str]


def kind(value: Any) -> str:
    """`value`'s kind (`NULL`, `POS`, ...)."""
    kind_of = type(value)
    if kind_of is float:
        return NULL if value != value else FLOAT
    if kind_of is int:  # a bool is not: pandas keeps bools as objects
        if 0 <= value < 2**63:
            return POS
        if -(2**63) <= value < 0:
            return NEG
        return UINT if 0 <= value < 2**64 else OTHER
    return NULL if value is None else OTHER


def signature(record: Mapping[str, Any]) -> Signature:
    return tuple(record), "".join(map(kind, record.values()))


class Columns:
    """The columns of a CSV of records, made from the distinct signatures of the records in
    order of first appearance: `first` lead, `drop` are left out."""

    def __init__(self, signatures: Sequence[Signature], first: Sequence[str] = (),
                 drop: Sequence[str] = ()) -> None:  # fmt: skip
        names = list(dict.fromkeys(name for keys, _ in signatures for name in keys))
        leading = [name for name in first if name in names] if names else list(first)
        self.names = [n for n in leading + [n for n in names if n not in leading] if n not in drop]
        kinds: dict[str, set[str]] = {name: set() for name in self.names}
        for keys, value_kinds in signatures:
            of = dict(zip(keys, value_kinds))
            for name in self.names:
                kinds[name].add(of.get(name, NULL))
        self._empty_cells = [j for j, name in enumerate(self.names) if NULL in kinds[name]]
        self._floats = [j for j, name in enumerate(self.names) if _float_column(kinds[name])]

    def row(self, record: Mapping[str, Any]) -> list[Any]:
        """`record`'s cells, for `csv.writer` (which writes None empty and a float's repr)."""
        row = [record.get(name) for name in self.names]
        for j in self._empty_cells:
            if row[j] != row[j]:  # NaN
                row[j] = None
        for j in self._floats:
            if row[j] is not None:
                row[j] = float(row[j])
        return row


def _float_column(kinds: set[str]) -> bool:
    """Whether pandas makes a column of these kinds float64 (`NEG` with `UINT` fits neither
    int64 nor uint64: objects)."""
    ints = kinds & {POS, NEG, UINT}
    return (bool(ints) and kinds <= _NUMERIC and not {NEG, UINT} <= kinds
            and bool(kinds & {NULL, FLOAT}))  # fmt: skip


def write(handle: TextIO, columns: Columns, records: Iterable[Mapping[str, Any]]) -> int:
    """Write the header and a row per record to `handle` (opened with ``newline=""``);
    returns the number of rows."""
    # pandas' own writer: the csv module, minimal quoting, the platform's line ending
    writer = csv.writer(handle, lineterminator=os.linesep)
    writer.writerow(columns.names)
    rows = 0
    for record in records:
        writer.writerow(columns.row(record))
        rows += 1
    return rows
