"""Plugin options: read from a class's ``__init__`` signature, validated and converted.

A plugin's options are the keyword arguments of its ``__init__``. Their annotations decide
how values are checked (Python API) and converted from ``KEY=VALUE`` strings (command line).
Supported annotations: ``bool``, ``int``, ``float``, ``str``, ``pathlib.Path``,
``Literal[...]``, ``X | None`` and ``list[X]``/``tuple[X, ...]`` of those (comma-separated
on the command line). An unannotated option, or one whose annotation does not resolve at run
time (a name imported only under ``TYPE_CHECKING``), accepts any value as given.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import pathlib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from toolkit.errors import OptionError

_MISSING = inspect.Parameter.empty
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One option of a plugin: its name, type annotation and default (if any)."""

    name: str
    annotation: Any
    default: Any = _MISSING

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def describe(self) -> str:
        text = f"{self.name}: {type_name(self.annotation)}"
        if not self.required:
            text += f" = {self.default!r}"
        return text


def option_specs(cls: type) -> dict[str, OptionSpec]:
    """The options of plugin class `cls`, in signature order."""
    init = cls.__init__
    if init is object.__init__:
        return {}
    signature = inspect.signature(init)
    hints = _type_hints(init)
    specs = {}
    for param in list(signature.parameters.values())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        annotation = hints.get(param.name, param.annotation)
        specs[param.name] = OptionSpec(param.name, annotation, param.default)
    return specs


def _type_hints(init: Any) -> dict[str, Any]:
    """`init`'s resolved annotations, one by one where some do not resolve.

    A plugin module that imports torch only under ``TYPE_CHECKING`` (as it should, to keep
    ``dtk plugins`` fast) has annotations like ``"torch.device | None"`` that cannot be
    evaluated; they stay strings (accepted as given) without spoiling the other options.
    """
    try:
        return typing.get_type_hints(init)
    except Exception:
        pass
    namespace = getattr(init, "__globals__", {})
    hints = {}
    for key, raw in getattr(init, "__annotations__", {}).items():
        holder = types.SimpleNamespace(__annotations__={key: raw})
        try:
            hints.update(typing.get_type_hints(holder, globalns=namespace))
        except Exception:
            hints[key] = raw
    return hints


def type_name(annotation: Any) -> str:
    if annotation is _MISSING:
        return "any"
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        return f"list of {type_name(typing.get_args(annotation)[0])}"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def describe_options(cls: type) -> str:
    specs = option_specs(cls)
    if not specs:
        return "it takes no options"
    return "accepted: " + ", ".join(spec.describe() for spec in specs.values())


def validate_options(
    cls: type, options: Mapping[str, Any], *, kind: str, name: str, from_strings: bool = False
) -> dict[str, Any]:
    """Check `options` against `cls`'s signature; convert strings if `from_strings`.

    Returns the options as keyword arguments for ``cls(**options)``. Raises `OptionError`
    naming the plugin and listing the accepted options.
    """
    specs = option_specs(cls)
    where = f"{kind} {name!r}"
    open_ended = accepts_extra_options(cls)
    unknown = [key for key in options if key not in specs]
    if unknown and not open_ended:
        raise OptionError(f"unknown option {unknown[0]!r} for {where}; {describe_options(cls)}")
    result = {}
    for key, value in options.items():
        if key not in specs:
            # passed through to a **kwargs plugin, which validates it itself
            result[key] = _guess(value) if from_strings else value
            continue
        spec = specs[key]
        try:
            result[key] = _coerce(value, spec.annotation, from_strings)
        except (TypeError, ValueError) as exc:
            raise OptionError(
                f"bad value {value!r} for option {key!r} of {where}: {exc}; {describe_options(cls)}"
            ) from None
    missing = [s.name for s in specs.values() if s.required and s.name not in result]
    if missing:
        raise OptionError(f"{where} needs option {missing[0]!r}; {describe_options(cls)}")
    return result


def accepts_extra_options(cls: type) -> bool:
    """Whether `cls.__init__` takes ``**kwargs`` (options it checks itself)."""
    if cls.__init__ is object.__init__:
        return False
    parameters = inspect.signature(cls.__init__).parameters.values()
    return any(p.kind == p.VAR_KEYWORD for p in parameters)


def _guess(text: Any) -> Any:
    """A command-line value for an untyped option: JSON if it parses (numbers, true/false,
    lists), else the string itself."""
    import json

    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_key_values(pairs: Iterable[str], *, what: str = "option") -> dict[str, str]:
    """Split ``KEY=VALUE`` strings (as given on the command line) into a dict."""
    result: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise OptionError(f"{what} {pair!r} is not of the form KEY=VALUE")
        if key in result:
            raise OptionError(f"{what} {key!r} is given twice")
        result[key] = value.strip()
    return result


def _coerce(value: Any, annotation: Any, from_strings: bool) -> Any:
    """`value` as `annotation` says, converted from a command-line string if `from_strings`.

    A converter per annotation (`_BY_ORIGIN` for ``X | Y``, ``Literal`` and lists, `_BY_TYPE`
    for the plain types, `_to_class` for any other class) rather than one long chain, so each
    rule reads on its own. Raises TypeError or ValueError, which `validate_options` reports.
    """
    if annotation is _MISSING or annotation is Any or isinstance(annotation, str):
        return value  # unannotated, or an annotation that does not resolve: as given
    convert = _BY_ORIGIN.get(typing.get_origin(annotation))
    if convert is None and isinstance(annotation, type):
        convert = _BY_TYPE.get(annotation)
    return (convert or _to_class)(value, annotation, from_strings)


def _to_union(value: Any, annotation: Any, from_strings: bool) -> Any:
    """``X | Y``: the first member that takes the value; ``none`` is None on the command line."""
    args = typing.get_args(annotation)
    if type(None) in args and (value is None or (from_strings and value == "none")):
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, from_strings)
        except (TypeError, ValueError):
            pass
    raise ValueError(f"expected {type_name(annotation)}")


def _to_literal(value: Any, annotation: Any, from_strings: bool) -> Any:
    """``Literal[...]``: one of the choices (matched by its text on the command line)."""
    choices = typing.get_args(annotation)
    for choice in choices:
        as_text = from_strings and isinstance(value, str) and str(choice) == value
        if value == choice or as_text:
            return choice
    raise ValueError("expected one of " + ", ".join(repr(c) for c in choices))


def _to_sequence(value: Any, annotation: Any, from_strings: bool) -> Any:
    """``list[X]`` or ``tuple[X, ...]``: each item as X (comma-separated on the command line);
    a lone string is refused, as it would otherwise be split into characters."""
    origin = typing.get_origin(annotation)
    item = typing.get_args(annotation)[0]
    if from_strings and isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"expected {type_name(annotation)}")
    items = [_coerce(v.strip() if isinstance(v, str) else v, item, from_strings) for v in value]
    return origin(items)


def _to_bool(value: Any, annotation: Any, from_strings: bool) -> bool:
    """``bool``: a bool, or on the command line 1/true/yes/on and 0/false/no/off."""
    if isinstance(value, bool):
        return value
    if from_strings and isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise TypeError("expected true or false")


def _to_int(value: Any, annotation: Any, from_strings: bool) -> int:
    """``int``: an int but not a bool (``True`` is no count)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if from_strings and isinstance(value, str):
        return int(value)
    raise TypeError("expected an integer")


def _to_float(value: Any, annotation: Any, from_strings: bool) -> float:
    """``float``: any number but a bool; ``nan`` typed on the command line is refused."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if from_strings and isinstance(value, str):
        number = float(value)
        if math.isnan(number):
            raise ValueError("expected a number, not nan")
        return number
    raise TypeError("expected a number")


def _to_str(value: Any, annotation: Any, from_strings: bool) -> str:
    if isinstance(value, str):
        return value
    raise TypeError("expected a string")


def _to_path(value: Any, annotation: Any, from_strings: bool) -> pathlib.Path:
    if isinstance(value, (str, pathlib.PurePath)):
        return pathlib.Path(value)
    raise TypeError("expected a path")


def _to_class(value: Any, annotation: Any, from_strings: bool) -> Any:
    """Any other class: an instance as given, or one made from the command-line string."""
    if isinstance(annotation, type) and isinstance(value, annotation):
        return value
    if from_strings and isinstance(annotation, type) and isinstance(value, str):
        return annotation(value)
    raise TypeError(f"expected {type_name(annotation)}")


#: a converter: (value, annotation, from_strings) -> the value, or TypeError/ValueError
_Converter = Callable[[Any, Any, bool], Any]

#: converters by the annotation's origin (``typing.get_origin``)
_BY_ORIGIN: dict[Any, _Converter] = {
    typing.Union: _to_union,
    types.UnionType: _to_union,
    typing.Literal: _to_literal,
    list: _to_sequence,
    tuple: _to_sequence,
}
#: converters by the annotation itself, for the plain types
_BY_TYPE: dict[type, _Converter] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
    pathlib.Path: _to_path,
}
