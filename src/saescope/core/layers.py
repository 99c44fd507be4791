"""Layer lists as users write them ('0,5,10-20'), and `--layers`: which of the SAEs' layers a command reads."""

from __future__ import annotations

import re
from dataclasses import dataclass

from saescope.core.errors import ParamError, SaescopeError
from saescope.core.schema import Config, config_field, escape

MAX_LAYERS = 10_000  # a bound for layer lists read before the model is known (no model has this many layers)


def parse_layers(spec: str | list[int] | None, n_layers: int | None) -> list[int]:
    """'0,5,10-20' -> [0, 5, 10, ..., 20]; None or 'all' -> every layer. n_layers None: the model is not known yet,
    so only the syntax and a generous bound are checked."""
    known = n_layers is not None
    n_layers = n_layers if known else MAX_LAYERS
    if spec is None or spec == "all":
        return list(range(n_layers))
    if isinstance(spec, list):
        layers = spec
    else:
        layers = []
        for part in str(spec).split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise SaescopeError(f"bad layer list {spec!r}: use e.g. 0,5,10-20")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise SaescopeError(f"bad layer range {part!r} in {spec!r}: write it low-high, e.g. {hi}-{lo}")
            layers.extend(range(lo, min(hi, max(lo, n_layers)) + 1))  # one past the end is enough to be refused below
    if not layers:
        raise SaescopeError(f"layer list {spec!r} names no layer (a range is written low-high, e.g. 1-3)")
    bad = [n for n in layers if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < n_layers]
    if bad:
        raise SaescopeError(f"layer {bad[0]} is out of range: the model has layers 0..{n_layers - 1}" if known
                            else f"layer {bad[0]} is out of range: layer numbers are 0..{n_layers - 1}")
    return sorted(set(layers))


@dataclass(kw_only=True)
class LayersOption(Config):
    """`--layers`: which of the SAEs' layers a command reads (default: all)."""

    layers: str | list[int] | None = config_field(None, "e.g. 0,5,10-20 (default: all the SAEs' layers)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layer_list()  # the syntax now; the range once the SAEs are read

    def layer_list(self) -> list[int] | None:
        if self.layers is None or self.layers == []:
            return None
        try:
            return parse_layers(self.layers, None)
        except SaescopeError as exc:
            raise ParamError("{}: " + escape(str(exc)), "layers") from None
