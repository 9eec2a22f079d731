"""Conditions: named attribute values (``digit=3``, ``group=dark``) and their class labels.

A label-conditioned model's ``toolkit.json`` names its attributes and their values::

    {"format": 1,
     "attributes": [{"name": "digit", "values": ["0", "1", ...], "droppable": true},
                    {"name": "group", "values": ["light", "dark"], "droppable": true}]}

Labels use a mixed-radix ("product") encoding: attribute ``a`` contributes its value's index,
or ``len(values)`` when left unspecified (only if ``droppable``), times the product of the
radices of the attributes before it. The label with every attribute unspecified is the
model's null label, used by classifier-free guidance. A class-conditional model without a
``toolkit.json`` has one attribute, ``class``, with values ``0 .. num_class_embeds - 1``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from toolkit.errors import DtkError

Condition = Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class Attribute:
    name: str
    values: tuple[str, ...]
    droppable: bool = True

    @property
    def radix(self) -> int:
        return len(self.values) + (1 if self.droppable else 0)


@dataclasses.dataclass(frozen=True)
class LabelSpace:
    """The attributes of a label-conditioned model and its label encoding."""

    attributes: tuple[Attribute, ...]

    @classmethod
    def from_json(cls, path: pathlib.Path) -> LabelSpace:
        try:
            data = json.loads(path.read_text())
            attributes = tuple(
                Attribute(
                    str(a["name"]),
                    tuple(str(v) for v in a["values"]),
                    bool(a.get("droppable", True)),
                )
                for a in data["attributes"]
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DtkError(f"{path} is not a valid toolkit.json: {exc}") from None
        if not attributes:
            raise DtkError(f"{path} names no attributes")
        _check_names(path, attributes)
        return cls(attributes)

    @classmethod
    def single_class(cls, num_classes: int) -> LabelSpace:
        return cls((Attribute("class", tuple(str(i) for i in range(num_classes)), False),))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": 1,
            "attributes": [
                {"name": a.name, "values": list(a.values), "droppable": a.droppable}
                for a in self.attributes
            ],
        }

    @property
    def num_labels(self) -> int:
        total = 1
        for attribute in self.attributes:
            total *= attribute.radix
        return total

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.attributes]

    def attribute(self, name: str) -> Attribute:
        for attribute in self.attributes:
            if attribute.name == name:
                return attribute
        raise DtkError(
            f"the model has no attribute {name!r}; its attributes: {', '.join(self.names)}"
        )

    def validate(self, condition: Condition) -> dict[str, str]:
        """Check a condition's names and values; returns it with values as strings."""
        result = {}
        for name, value in condition.items():
            attribute = self.attribute(name)
            value = str(value)
            if value not in attribute.values:
                raise DtkError(
                    f"attribute {name!r} has no value {value!r}; "
                    f"choose one of: {', '.join(attribute.values)}"
                )
            result[name] = value
        for attribute in self.attributes:
            if attribute.name not in result and not attribute.droppable:
                raise DtkError(
                    f"the model cannot leave attribute {attribute.name!r} unspecified; "
                    f"give --condition {attribute.name}=VALUE "
                    f"(one of: {', '.join(attribute.values)})"
                )
        return result

    def label(self, condition: Condition) -> int:
        condition = self.validate(condition)
        label, stride = 0, 1
        for attribute in self.attributes:
            value = condition.get(attribute.name)
            index = len(attribute.values) if value is None else attribute.values.index(value)
            label += index * stride
            stride *= attribute.radix
        return label

    @property
    def null_label(self) -> int | None:
        """The label with every attribute unspecified, if the model has one."""
        if not all(a.droppable for a in self.attributes):
            return None
        return self.label({})

    def decode(self, label: int) -> dict[str, str]:
        condition = {}
        for attribute in self.attributes:
            label, index = divmod(label, attribute.radix)
            if index < len(attribute.values):
                condition[attribute.name] = attribute.values[index]
        return condition


def _check_names(path: pathlib.Path, attributes: tuple[Attribute, ...]) -> None:
    """Names and values must be told apart: distinct, and not empty (an empty value would
    read as "unspecified" in metadata)."""
    _check_distinct(path, "attribute names", [a.name for a in attributes])
    for attribute in attributes:
        _check_distinct(path, f"values of attribute {attribute.name!r}", list(attribute.values))


def _check_distinct(path: pathlib.Path, what: str, items: list[str]) -> None:
    if any(not item.strip() for item in items):
        raise DtkError(f"{path}: the {what} include an empty one")
    repeated = sorted({item for item in items if items.count(item) > 1})
    if repeated:
        raise DtkError(f"{path}: the {what} name {repeated[0]!r} twice")


def parse_conditions(pairs: Iterable[str]) -> dict[str, str]:
    """``["digit=3", "group=dark"]`` -> ``{"digit": "3", "group": "dark"}``."""
    from toolkit.registry.options import parse_key_values

    return parse_key_values(pairs, what="condition")


def folder_name(condition: Condition, order: Sequence[str]) -> str:
    """The class subfolder of a sample: its attribute values joined, in the model's order.

    Each value is made a safe name first (`toolkit.data.paths.safe_name`): a model folder may
    name a value ``..``, ``/etc`` or nothing at all, and none of them may lead a file out
    of the output folder or into a hidden one.
    """
    from toolkit.data.paths import safe_name

    values = [safe_name(str(condition[name])) for name in order if name in condition]
    return "_".join(values) if values else "unconditional"
