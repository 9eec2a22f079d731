"""Attribute words: how each attribute value is said in a prompt, for text-to-image models.

The fairness tools speak attributes (``gender=female``); a text-to-image model and a CLIP
classifier need words. A small TOML file holds, per attribute, its values in order and the
text each one puts into a prompt::

    # words.toml
    [gender]
    female = "female"
    male = "male"

    [skin_tone]
    light = "light-skinned"
    dark = "dark-skinned"

The values (the keys) are what datasets, metadata and reports record; the words fill the
``{...}`` fields of prompt templates: ``dtk synthesize --prompt-template``, the ``clip``
classifier's templates and the ``fair`` guidance's edit prompts (plugin option ``words``).
A value whose word is the value itself may still be listed, to fix the values' order.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Mapping, Sequence

from toolkit.errors import DtkError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the same parser, before it joined the standard library
    import tomli as tomllib

Words = dict[str, dict[str, str]]


def read_words(path: str | pathlib.Path) -> Words:
    """The file's attributes, each mapping its values (in file order) to their words.

    Every user mistake (a missing file, bad TOML, a value that is not a string, an attribute
    with no values, empty words) is a `DtkError` naming the file.
    """
    path = pathlib.Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DtkError(f"cannot read the words file {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DtkError(f"{path} is not a valid TOML words file: {exc}") from None
    words: Words = {}
    for attribute, table in data.items():
        if not isinstance(table, Mapping):
            raise DtkError(
                f'{path}: {attribute!r} must be a table of value = "words" lines '
                f'([{attribute}] then e.g. female = "woman")'
            )
        if not table:
            raise DtkError(f"{path}: attribute {attribute!r} lists no values")
        for value, text in table.items():
            if not isinstance(text, str) or not text.strip():
                raise DtkError(
                    f"{path}: {attribute}.{value} must be non-empty text in quotes, got {text!r}"
                )
        words[str(attribute)] = {str(v): t.strip() for v, t in table.items()}
    if not words:
        raise DtkError(f"{path} holds no attributes: add a [ATTRIBUTE] table of value = words")
    return words


def attribute_words(
    words: Words, attribute: str, *, source: object = "the words file"
) -> dict[str, str]:
    """One attribute's value -> words, or a `DtkError` naming the attributes there are."""
    try:
        return words[attribute]
    except KeyError:
        raise DtkError(
            f"{source} has no attribute {attribute!r}; it has: {', '.join(words)}"
        ) from None


def value_words(
    attribute: str, values: Sequence[str] | None, path: str | pathlib.Path | None
) -> dict[str, str]:
    """Each value of `attribute` -> the words that stand for it, in the values' order.

    From the words file at `path`: every value it lists for `attribute` when `values` is
    None, else each of `values`, which must all be listed. Without a file, each of `values`
    stands for itself. Mistakes are a `DtkError` naming the file.
    """
    if path is None:
        return {str(v): str(v) for v in values or ()}
    table = attribute_words(read_words(path), attribute, source=f"the words file {path}")
    if values is None:
        return dict(table)
    values = [str(v) for v in values]
    missing = [v for v in values if v not in table]
    if missing:
        raise DtkError(
            f"the words file {path} has no words for {attribute} value {missing[0]!r}; "
            f"it lists: {', '.join(table)}"
        )
    return {v: table[v] for v in values}
