"""Validation at the boundary: every file saescope reads and every number a user types is checked here,
so that what parses but is wrong becomes one line naming the file (or flag) and the field, never a traceback.

- `check_record(obj, spec, origin)`: a JSON object against field specs (type, required, range).
- `check_dataclass(cls, obj, origin)`: the same, with the fields, types and defaults of a config dataclass.
- `check_number(value, name, ...)`: one numeric value's range, for flags and config fields alike.
- `config_field(default, help)`: a config dataclass field that carries its command-line help, so that a command's
  flags are built from the config (saescope.cli.flags.add_config_flags) and its defaults live in one place.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any

from saescope.core.errors import SaescopeError


class InputError(SaescopeError):
    """A file or flag that parses but holds something wrong; the message names where and what."""


_TYPE_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}


def _type_ok(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_number(value: Any, name: str, *, kind: type = float, min: float | None = None, max: float | None = None,
                 min_open: bool = False, origin: str = "") -> Any:
    """`value` as `kind` within [min, max] (min excluded when min_open); NaN and infinities are refused."""
    where = f"{origin}: " if origin else ""
    if not _type_ok(value, kind):
        raise InputError(f"{where}{name} must be {_TYPE_NAMES[kind]}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise InputError(f"{where}{name} must be a finite number, got {value!r}")
    if min is not None and (value <= min if min_open else value < min):
        raise InputError(f"{where}{name} must be {'>' if min_open else '>='} {min:g}, got {value!r}")
    if max is not None and value > max:
        raise InputError(f"{where}{name} must be <= {max:g}, got {value!r}")
    return value


@dataclass(frozen=True)
class Field:
    """One field of a JSON record: its type (a type or a tuple of types), whether it must be there, and a range."""

    kind: type | tuple[type, ...]
    required: bool = True
    nullable: bool = False
    min: float | None = None
    max: float | None = None
    check: Callable[[Any], str | None] | None = None  # returns what is wrong, or None


def _describe(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)


def check_record(obj: Any, spec: dict[str, Field], origin: str) -> dict:
    """Check a parsed JSON object against `spec`; unknown keys pass (files carry extra metadata)."""
    if not isinstance(obj, dict):
        raise InputError(f"{origin}: expected a JSON object, got {type(obj).__name__}")
    for name, f in spec.items():
        if name not in obj:
            if f.required:
                raise InputError(f"{origin}: field {name!r} is missing")
            continue
        value = obj[name]
        if value is None:
            if f.nullable:
                continue
            raise InputError(f"{origin}: field {name!r} is null, expected {_describe(f.kind)}")
        kinds = f.kind if isinstance(f.kind, tuple) else (f.kind,)
        if not any(_type_ok(value, k) for k in kinds):
            raise InputError(f"{origin}: field {name!r} must be {_describe(f.kind)}, got {value!r}"[:300])
        if (f.min is not None or f.max is not None) and isinstance(value, (int, float)):
            check_number(value, f"field {name!r}", kind=float, min=f.min, max=f.max, origin=origin)
        if f.check and (problem := f.check(value)):
            raise InputError(f"{origin}: field {name!r} {problem}")
    return obj


def config_field(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with its help text (and e.g. `choices`) for the command line."""
    return field(default=default, metadata={"help": help, **metadata})


def field_kind(tp: Any) -> tuple[tuple[type, ...], bool]:
    """(accepted JSON types, nullable) of a dataclass annotation such as `int | None` or `dict`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        kinds: list[type] = []
        for arg in args:
            if arg is not type(None):
                kinds.extend(field_kind(arg)[0])
        return tuple(kinds), type(None) in args
    base = origin or tp
    return ((float,) if base is float else (base,)), False


def check_dataclass(cls: type, obj: Any, origin: str) -> dict:
    """Check a JSON object against a config dataclass: each known field's type; missing fields with a default pass.
    Returns the known fields only (files written by another version may carry more)."""
    assert is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    spec = {}
    for f in fields(cls):
        kinds, nullable = field_kind(hints[f.name])
        has_default = f.default is not MISSING or f.default_factory is not MISSING
        spec[f.name] = Field(kinds, required=not has_default, nullable=nullable)
    check_record(obj, spec, origin)
    return {k: v for k, v in obj.items() if k in spec}
