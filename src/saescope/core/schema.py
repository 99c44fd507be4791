"""Validation at the boundary: every file saescope reads and every number a user types is checked here,
so that what parses but is wrong becomes one line naming the file (or flag) and the field, never a traceback.

- `check_record(obj, spec, origin)`: a JSON object against field specs (type, required, range).
- `check_dataclass(cls, obj, origin)`: a saved config against its dataclass, strictly: every field there, with its type.
- `check_number(value, name, ...)`: one numeric value's range, for flags and config fields alike.
- `config_field(default, help)`: a config dataclass field that carries its command-line help, so that a command's
  flags are built from the config (saescope.cli.flags.add_config_flags) and its defaults live in one place.
"""

from __future__ import annotations

import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from saescope.core.errors import InputError, ParamError


def escape(text: str) -> str:
    """Text to put into a ParamError template as it is."""
    return text.replace("{", "{{").replace("}", "}}")


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
    problem = None
    if not _type_ok(value, kind):
        problem = f"must be {_TYPE_NAMES[kind]}, got {value!r}"
    elif kind is float and not math.isfinite(value):
        problem = f"must be a finite number, got {value!r}"
    elif min is not None and (value <= min if min_open else value < min):
        problem = f"must be {'>' if min_open else '>='} {min:g}, got {value!r}"
    elif max is not None and value > max:
        problem = f"must be <= {max:g}, got {value!r}"
    if problem is None:
        return value
    where = f"{origin}: " if origin else ""
    if name.isidentifier():  # a parameter: the command line shows its flag instead of the name
        raise ParamError(escape(where) + "{} " + escape(problem), name)
    raise InputError(f"{where}{name} {problem}")


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


REQUIRED: Any = MISSING  # config_field(REQUIRED, ...): a field the caller must give


def config_field(default: Any, help: str, *, min: float | None = None, max: float | None = None, min_open: bool = False,
                 choices: tuple | None = None, output: str | None = None, flag: str | None = None, positional: bool = False,
                 repeat: bool = False) -> Any:
    """A config dataclass field with everything its validation and its command-line flag need: the help text, the
    range (`min`, `max`, `min_open`) and `choices` that `Config` checks on construction, `output` ("file" or
    "folder": a path written to, checked before any work), and for the flag itself: another name (`flag`), a
    positional argument, or a flag given several times (`repeat`, a list field). A list default is copied per
    instance."""
    metadata = {"help": help, "min": min, "max": max, "min_open": min_open, "choices": choices, "output": output,
                "flag": flag, "positional": positional, "repeat": repeat}
    if default is MISSING:
        return field(metadata=metadata)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def item_type(kind: Any) -> type | None:
    """The element type of list[int] / tuple[float, ...] (None for other annotations)."""
    origin = typing.get_origin(kind)
    args = [a for a in typing.get_args(kind) if a is not Ellipsis]
    return args[0] if origin in (list, tuple) and args else None


def value_kinds(tp: Any) -> tuple[list[Any], bool]:
    """(the annotations a value may match, nullable) of `int | list[int] | None` and the like."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        return [a for a in args if a is not type(None)], type(None) in args
    return [tp], False


def _kind_name(kind: Any) -> str:
    items = item_type(kind)
    if items is not None:
        return f"a list of {_PLURALS.get(items, getattr(items, '__name__', str(items)))}"
    if typing.get_origin(kind) is dict and len(typing.get_args(kind)) == 2:
        keys, values = typing.get_args(kind)
        return f"an object of {_PLURALS.get(values, getattr(values, '__name__', str(values)))}"
    base = typing.get_origin(kind) or kind
    return _TYPE_NAMES.get(base, getattr(base, "__name__", str(base)))


_PLURALS = {int: "integers", float: "numbers", str: "strings"}


def _fits(value: Any, kind: Any) -> bool:
    items = item_type(kind)
    if items is not None:
        return isinstance(value, (list, tuple)) and all(_type_ok(v, items) for v in value)
    if typing.get_origin(kind) is dict and len(typing.get_args(kind)) == 2:  # dict[str, float]: keys and values typed
        keys, values = typing.get_args(kind)
        return isinstance(value, dict) and all(_type_ok(k, keys) and _type_ok(v, values) for k, v in value.items())
    base = typing.get_origin(kind) or kind
    return base is Any or _type_ok(value, base)


def check_config(cfg: Any) -> None:
    """Every field of the config dataclass `cfg` against its annotation (no bool for an int, no float for an int, no
    dict for a list), its range and choices (config_field), and its output path, naming the field (ParamError)."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        kinds, nullable = value_kinds(hints[f.name])
        if value is None and nullable:
            continue
        if not any(_fits(value, k) for k in kinds):
            want = " or ".join(map(_kind_name, kinds))
            raise ParamError(f"{{}} must be {want}, got {escape(repr(value)[:200])}", f.name)
        for v in value if isinstance(value, (list, tuple)) else value.values() if isinstance(value, dict) else [value]:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if isinstance(v, float) or meta.get("min") is not None or meta.get("max") is not None:
                    check_number(v, f.name, kind=float if isinstance(v, float) else int, min=meta.get("min"),
                                 max=meta.get("max"), min_open=bool(meta.get("min_open")))
            if meta.get("choices") and v not in meta["choices"]:
                raise ParamError(f"{{}} must be one of {escape(', '.join(map(str, meta['choices'])))}, got {escape(repr(v))}", f.name)
        if meta.get("output") and isinstance(value, str):
            check_writable(Path(value), f.name, folder=meta["output"] == "folder")


@dataclass(kw_only=True)
class Config:
    """A command's settings, validated on construction (check_config); a subclass checks what depends on several
    fields in its own __post_init__, after calling this one. Keyword-only, so that shared groups of fields (the SAEs
    to read, a control) can be inherited in any order."""

    def __post_init__(self) -> None:
        check_config(self)

    def to_dict(self) -> dict:
        return asdict(self)


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


def check_dataclass(cls: type, obj: Any, origin: str, *, migrations: dict[str, Any] | None = None) -> dict:
    """Check a record read back (a saved config) against its config dataclass: every field must be there with its type;
    a missing field is refused, never defaulted, except those in `migrations` (fields added after records of that kind
    were first written, with the value such older records mean). Returns the known fields, migrations applied (files
    written by a newer version may carry more)."""
    assert is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    if isinstance(obj, dict) and migrations:
        obj = {**{k: v for k, v in migrations.items() if k not in obj}, **obj}
    spec = {}
    for f in fields(cls):
        kinds, nullable = field_kind(hints[f.name])
        spec[f.name] = Field(kinds, required=True, nullable=nullable)
    check_record(obj, spec, origin)
    return {k: v for k, v in obj.items() if k in spec}


# Names of the files saescope reads back (run folders, SAE formats, footprints, feature stores): never an output file.
READ_BACK = re.compile(r"train\.json|train_log\.jsonl|train_summary\.json|latest|eval(-\d+)?\.json|layer\d+\.(json|safetensors|sae\.pt)"
                       r"|state-rank\d+\.pt|cfg\.json|sae(_weights)?\.safetensors|footprints\.json|redundancy\.json"
                       r"|store\.json|tokens\.json|progress\.json")


def check_writable(path: Path, param: str, *, folder: bool) -> None:
    """An output path that cannot be created is refused before any work: a file where a folder must go, or the
    other way round, here or above; and a file saescope reads back is never an output file."""
    where = escape(str(path))
    if path.exists() and path.is_dir() != folder:
        raise ParamError(f"{{}} {where}: {'a file exists there, not a folder' if folder else 'is a folder, not a file'}", param)
    if not folder and path.exists() and READ_BACK.fullmatch(path.name):
        raise ParamError(f"{{}} {where}: a file saescope reads back (run, SAE or store data) is never overwritten; write elsewhere",
                         param)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ParamError(f"{{}} {where}: {escape(str(parent))} is a file, so nothing can be written under it", param)
            break
