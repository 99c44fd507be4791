"""How every command line is made: a command is a config dataclass and a run function of the library (`Command`); its
flags are the config's fields (`add_config_flags`: name, type, default, help, choices, positional or repeated, all from
saescope.core.schema.config_field), the parsed flags build the config (which validates itself), the run returns a
result, and the CLI prints `result.text()`. Nothing here knows what a command does."""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import Any

from saescope.core.schema import item_type, value_kinds


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, as every other error of the command line."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)  # `--max-tok` would slip past the resume check

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"saescope: error: {self.prog.removeprefix('saescope ') or 'saescope'}: {message}", file=sys.stderr)
        sys.exit(2)


@dataclass(frozen=True)
class Command:
    """A command: its config dataclass, the library function that runs it (config -> result with `.text()`), and its
    one-line help. `launch`, a second config, adds flags for how the run is launched (train's --resume), and `handler`
    replaces config -> run -> print for the one command that needs both (train)."""

    config: type
    run: Callable[[Any], Any]
    help: str
    launch: type | None = None
    handler: Callable[[argparse.Namespace], None] | None = None


@dataclass(frozen=True)
class Group:
    """Subcommands under one name (`saescope toxicity mine`)."""

    help: str
    commands: dict[str, Command]


def add_commands(sub: argparse._SubParsersAction, commands: dict[str, Command | Group]) -> None:
    for name, command in commands.items():
        if isinstance(command, Group):
            p = sub.add_parser(name, help=command.help)
            add_commands(p.add_subparsers(dest=f"{name}_command", required=True), command.commands)
            continue
        p = sub.add_parser(name, help=command.help, description=command.help)
        add_config_flags(p, command.config)
        if command.launch is not None:
            add_config_flags(p, command.launch)
        p.set_defaults(_command=command)


def flag_name(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _comma_list(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",")]
        except ValueError:
            what = {int: "integers", float: "numbers"}.get(kind, "values")
            raise argparse.ArgumentTypeError(f"expected {what} separated by commas, got {text!r}") from None
    parse.__name__ = f"list of {kind.__name__}"
    return parse


def add_config_flags(p: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of the config dataclass `cls` that carries help (saescope.core.schema.config_field):
    `--ctx-len` for ctx_len (or the field's own `flag`), typed as the field, with its default, help and choices; a bool
    field is a switch (a default of True gives a switch that turns it off); a list field takes comma-separated values,
    or one value per flag given several times (`repeat`); a `positional` field is an argument without a flag."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        meta = f.metadata
        if f.name in skip or "help" not in meta:
            continue
        kinds, _ = value_kinds(hints[f.name])
        kind = kinds[0]
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else None)
        required = f.default is MISSING and f.default_factory is MISSING
        text = meta["help"].replace("%", "%%")  # argparse formats help with %: "20% comments" would crash --help
        kwargs: dict[str, Any] = {"help": text}
        if kind is bool:
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            items = item_type(kind)
            if items is not None:
                kwargs.update(type=items, action="append") if meta.get("repeat") else kwargs.update(type=_comma_list(items))
            else:
                kwargs["type"] = kind if kind in (int, float) else str
            if meta.get("choices") and items is None:  # a list's items are checked by the config, one by one
                kwargs["choices"] = meta["choices"]
            if default not in (None, []) and "default" not in text:
                shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else (
                    f"{default:,}" if isinstance(default, int) else default)
                kwargs["help"] = f"{text} (default: {shown})"
        if meta.get("positional"):
            p.add_argument(f.name, **kwargs)
            continue
        kwargs["dest"] = f.name
        if required:
            kwargs["required"] = True
        elif kind is not bool and not meta.get("repeat"):
            kwargs["default"] = default
        p.add_argument(flag_name(f), **kwargs)


def config_from_flags(cls: type, a: argparse.Namespace, **values: object):
    """The config dataclass `cls` from the parsed flags of its fields (a flag left at None keeps the field's default),
    with `values` taking precedence. Building it validates it."""
    hints = typing.get_type_hints(cls)
    given: dict[str, object] = {}
    for f in fields(cls):
        value = getattr(a, f.name, None)
        if value is None or "help" not in f.metadata:
            continue
        if isinstance(value, list) and any(typing.get_origin(k) is tuple for k in value_kinds(hints[f.name])[0]):
            value = tuple(value)
        given[f.name] = value
    return cls(**{**given, **values})


def flags_of(command: Command) -> dict[str, str]:
    """{field: its flag}, to show a ParamError of this command in the command line's terms."""
    classes = [command.config] + ([command.launch] if command.launch else [])
    return {f.name: (f.name if f.metadata.get("positional") else flag_name(f)) for cls in classes for f in fields(cls)
            if "help" in f.metadata}


def given_flags(argv: list[str]) -> set[str]:
    """The flags typed on the command line (as dest names), to tell a chosen value from a default."""
    return {tok[2:].split("=", 1)[0].replace("-", "_") for tok in argv if tok.startswith("--")}
