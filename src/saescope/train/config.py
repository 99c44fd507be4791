"""Training configuration: one dataclass, validated on construction, saved beside every run."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

from saescope.errors import SaescopeError

# Qwen-Scope's released widths: 16x with k 50 or 100 (dense models), 64x with k 100 (MoE models).
PRESETS = {"16x-k50": (16, 50), "16x-k100": (16, 100), "64x-k100": (64, 100), "8x-k32": (8, 32), "4x-k32": (4, 32)}


def parse_layers(spec: str | list[int] | None, n_layers: int) -> list[int]:
    """'0,5,10-20' -> [0, 5, 10, ..., 20]; None or 'all' -> every layer."""
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
            layers.extend(range(lo, hi + 1))
    bad = [n for n in layers if not 0 <= n < n_layers]
    if bad:
        raise SaescopeError(f"layer {bad[0]} is out of range: the model has layers 0..{n_layers - 1}")
    return sorted(set(layers))


@dataclass
class TrainConfig:
    model: str | None = None  # built-in name, folder, .gguf or hub id; None = SmolLM2-135M-Instruct
    data: str | None = None  # file, folder or hub dataset; None = the embedded corpus
    out: str = "runs/default"
    text_column: str = "text"
    layers: str | None = None  # e.g. "0,5,10-20"; None = every decoder layer
    preset: str | None = "16x-k50"
    expansion: int | None = None  # overrides the preset's width multiple
    k: int | None = None  # overrides the preset's k
    ctx_len: int = 256
    batch_size: int = 16  # sequences per step (tokens per step = batch_size * ctx_len)
    max_tokens: int = 1_000_000
    lr: float | None = None  # None: 2e-4 / sqrt(d_sae / 2**14)
    lr_decay_frac: float = 0.2  # lr falls linearly to 0 over this final fraction of the steps; 0 = constant
    auxk_alpha: float = 1 / 32
    dead_tokens: int = 10_000_000  # a latent is dead after this many tokens without firing
    outlier_factor: float = 5.0  # drop tokens with norm > factor * running median norm; 0 = off
    skip_first_token: bool = False
    model_dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    sae_dtype: str = "auto"  # dtype of the encoder matmul and top-k; master weights stay fp32
    device: str = "auto"
    model_device_map: str | None = None  # "auto": shard the LM over the visible GPUs (accelerate)
    load_in_8bit: bool = False  # LM weights in 8 bits (bitsandbytes); activations stay in model_dtype
    checkpoint_every: int = 50  # steps
    log_every: int = 5  # steps
    seed: int = 0  # initialisation; also the data order unless data_seed is set
    data_seed: int | None = None  # fixes the data order across seeds (stability checks train on the same data)
    shuffle_buffer: int = 512
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise SaescopeError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        for name in ("ctx_len", "batch_size", "max_tokens", "checkpoint_every", "log_every", "dead_tokens"):
            if getattr(self, name) <= 0:
                raise SaescopeError(f"{name} must be positive, got {getattr(self, name)}")
        if self.expansion is not None and self.expansion <= 0:
            raise SaescopeError(f"expansion must be positive, got {self.expansion}")
        if self.k is not None and self.k <= 0:
            raise SaescopeError(f"k must be positive, got {self.k}")
        if not 0 <= self.lr_decay_frac <= 1:
            raise SaescopeError(f"lr_decay_frac must be in [0, 1], got {self.lr_decay_frac}")
        if self.outlier_factor < 0:
            raise SaescopeError(f"outlier_factor must be >= 0, got {self.outlier_factor}")

    def width_and_k(self, d_model: int) -> tuple[int, int]:
        expansion, k = PRESETS.get(self.preset or "", (16, 50))
        d_sae = d_model * (self.expansion or expansion)
        k = self.k or k
        if k > d_sae:
            raise SaescopeError(f"k={k} is larger than d_sae={d_sae}")
        return d_sae, k

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
