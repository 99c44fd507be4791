"""What every command shares: the parser with one-line errors, flags built from config dataclasses, the ranges of
numeric flags, and the checks of output paths made before any model is loaded or anything is written."""

from __future__ import annotations

import argparse
import os
import re
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from saescope.core.errors import SaescopeError
from saescope.core.schema import check_number, field_kind


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, as every other error of the command line."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)  # `--max-tok` would slip past the resume check

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"saescope: error: {self.prog.removeprefix('saescope ') or 'saescope'}: {message}", file=sys.stderr)
        sys.exit(2)


def add_config_flags(p: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of the config dataclass `cls` (`--ctx-len` for ctx_len), with the field's type, default,
    help and choices (saescope.core.schema.config_field); a bool field is a switch. Fields that are not plain values
    (dicts, lists) and those in `skip` get no flag."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        kinds, _ = field_kind(hints[f.name])
        if f.name in skip or kinds[0] not in (str, int, float, bool):
            continue
        flag = "--" + f.name.replace("_", "-")
        if kinds[0] is bool:
            p.add_argument(flag, action="store_true", help=f.metadata.get("help"))
            continue
        default = f.default if f.default is not MISSING else None
        text = f.metadata.get("help") or ""
        if default is not None and "default" not in text:
            text += f" (default: {default:,})" if isinstance(default, int) else f" (default: {default})"
        p.add_argument(flag, type=kinds[0], default=default, choices=f.metadata.get("choices"), help=text or None)


def config_from_flags(cls: type, a: argparse.Namespace, **values: object):
    """The config dataclass `cls` from the parsed flags of its fields, with `values` taking precedence."""
    given = {f.name: getattr(a, f.name) for f in fields(cls) if hasattr(a, f.name)}
    return cls(**{**given, **values})


def add_sae_flags(p: argparse.ArgumentParser, *, layers: bool = True) -> None:
    """--sae, --model, --layers, --k and --model-dtype, as every command that reads SAEs takes them."""
    p.add_argument("--sae", required=True, help="SAE folder (saescope run, Qwen-Scope, SAELens or sparsify)")
    p.add_argument("--model", help="default: the SAEs' model")
    if layers:
        p.add_argument("--layers", help="e.g. 0,5,10-20 (default: all the SAEs' layers)")
    p.add_argument("--k", type=int, help="k, for Qwen-Scope folders whose name does not give it")
    add_model_dtype_flag(p)


def add_model_dtype_flag(p: argparse.ArgumentParser) -> None:
    """--model-dtype: the dtype of the LM whose activations a command reads."""
    p.add_argument("--model-dtype", choices=["fp32", "bf16", "auto"], default="fp32",
                   help="the LM's dtype: fp32 (default: figures comparable across machines), bf16, or auto (bf16 on GPU "
                        "and on CPUs measured fast at it, ~2-3x faster there; what training's default uses)")


def add_shared_data_flag(p: argparse.ArgumentParser) -> None:
    """--shared-data: the shared reference data folder (benchmarks, scores, labelled sets), for this command."""
    p.add_argument("--shared-data", help="the shared reference data folder (default: $SAESCOPE_SHARED_DATA)")


def apply_shared_data(a: argparse.Namespace) -> None:
    """A --shared-data given on the line wins over the environment for this process (the loaders read the variable)."""
    from saescope.core.data.benchmarks import SHARED_ENV, shared_data_dir

    if getattr(a, "shared_data", None):
        if not Path(a.shared_data).expanduser().is_dir():
            raise SaescopeError(f"--shared-data {a.shared_data}: not a folder (point it at the shared reference data, "
                                "holding benchmarks/)")
        os.environ[SHARED_ENV] = str(shared_data_dir(a.shared_data))


def writes(p: argparse.ArgumentParser, flag: str, *, folder: bool, **kwargs) -> None:
    """An output flag: its path is checked before any work (saescope.cli.flags.check_flags), a folder or a file."""
    p.add_argument(flag, **kwargs)
    dest = flag.lstrip("-").replace("-", "_")
    outputs = dict(p.get_default("output_paths") or {})
    p.set_defaults(output_paths={**outputs, dest: "folder" if folder else "file"})


def layer_list(spec: str | None) -> list[int] | None:
    """A --layers flag: None (all) or the layer numbers; their range is checked once the model is known."""
    if not spec:
        return None
    from saescope.core.train import parse_layers

    return parse_layers(spec, None)


def int_list(spec: str) -> list[int]:
    try:
        return [int(x) for x in spec.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {spec!r}") from None


def model_of(saes: dict, given: str | None) -> str:
    """The model to load for these SAEs: the one given, else the one they record."""
    model = given or next(iter(saes.values())).meta.get("model")
    if not model:
        raise SaescopeError("these SAEs do not name their model: pass --model")
    return model


# Every numeric flag's range, in one place, by its name (`COMMAND.name` where one command differs):
# (type, lowest, highest, lowest excluded). Every float flag must also be finite, whatever its name.
FLAG_RANGES: dict[str, tuple[type, float | None, float | None, bool]] = {
    **{name: (int, 1, None, False) for name in (
        "k", "expansion", "batch_size", "max_tokens", "checkpoint_every", "log_every", "dead_tokens", "seeds", "n_tokens",
        "limit", "top", "max_length", "top_n", "max_new_tokens", "repeats", "matched_repeats", "n_perm",
        "tokens_per_step", "shuffle_buffer", "per_class", "fvu_tokens")},
    "ctx_len": (int, 2, None, False),
    "gpus": (int, 1, None, False),
    **{name: (int, 0, None, False) for name in ("seed", "data_seed", "eval_tokens", "layer", "feature", "contexts",
                                                "activation_buffer", "absorption_words")},
    "stability.n_tokens": (int, 0, None, False),  # 0 = compare decoders only
    "port": (int, 0, 65535, False),
    "lr": (float, 0, None, True),
    "tflops": (float, 0, None, True),
    "lr_decay_frac": (float, 0, 1, False),
    "subsume": (float, 0, 1, False),
    "variance": (float, 0, 1, True),
    "outlier_factor": (float, 0, None, False),
    "auxk_alpha": (float, 0, None, False),
    "temperature": (float, 0, None, False),
}
# Names of the files saescope reads back (run folders, SAE formats, footprints, feature stores): never an output file.
READ_BACK = re.compile(r"train\.json|train_log\.jsonl|train_summary\.json|latest|eval(-\d+)?\.json|layer\d+\.(json|safetensors|sae\.pt)"
                       r"|state-rank\d+\.pt|cfg\.json|sae(_weights)?\.safetensors|footprints\.json|redundancy\.json"
                       r"|store\.json|tokens\.json|progress\.json")


def given_flags(argv: list[str]) -> set[str]:
    """The flags typed on the command line (as dest names), to tell a chosen value from a default."""
    return {tok[2:].split("=", 1)[0].replace("-", "_") for tok in argv if tok.startswith("--")}


def check_flags(a: argparse.Namespace) -> None:
    """Ranges of numeric flags and output paths, before anything is loaded or written."""
    outputs = getattr(a, "output_paths", None) or {}
    for name, value in vars(a).items():
        if name in ("output_paths", "given"):
            continue
        flag = "--" + name.replace("_", "-")
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float):
                check_number(v, flag)
            rule = FLAG_RANGES.get(f"{a.command}.{name}") or FLAG_RANGES.get(name)
            if rule is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
                kind, lo, hi, open_lo = rule
                check_number(v, flag, kind=kind, min=lo, max=hi, min_open=open_lo)
        if isinstance(value, str) and name in outputs:
            check_writable(Path(value), flag, folder=outputs[name] == "folder")


def check_writable(path: Path, flag: str, *, folder: bool) -> None:
    """An output path that cannot be created is refused before any work: a file where a folder must go, or the
    other way round, here or above."""
    if path.exists() and path.is_dir() != folder:
        raise SaescopeError(f"{flag} {path}: {'a file exists there, not a folder' if folder else 'is a folder, not a file'}")
    if not folder and path.exists() and READ_BACK.fullmatch(path.name):
        raise SaescopeError(f"{flag} {path}: a file saescope reads back (run, SAE or store data) is never overwritten; write elsewhere")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SaescopeError(f"{flag} {path}: {parent} is a file, so nothing can be written under it")
            break
