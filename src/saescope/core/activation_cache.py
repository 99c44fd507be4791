"""Residual-stream activations on disk: `saescope cache` writes them once, and `saescope train --activations` trains any
number of SAEs from them (or from one .npy / .safetensors file) without running the language model again.

A cache folder:

    cache.json                            what was cached (model, data, layers, dtype, ctx_len, seed), the shards
                                          written, the data batches consumed, and the outlier filter's counts
    layer{n}/shard-{i:06d}.safetensors    one tensor "activations" (tokens, d_model) per layer and shard

Every token is kept (the trainer applies its own outlier filter, as on live activations); cache.json counts those the
filter would drop at the cache's factor. A shard is written for every layer before cache.json names it, so a cache
killed at any point holds whole shards only, and the same command again goes on from the last one named.

Reading memory-maps each shard (the safetensors layout is a JSON header, then the raw tensor), so a cache larger than
memory trains: each step gathers its rows from the page cache. Training order: pass p over the N cached tokens follows
a permutation seeded by (seed, p); step s trains on stream positions [s T, (s + 1) T) of pass after pass (T tokens per
step), so a step's tokens follow from its number alone and a run resumed after kill -9 draws exactly what it would have.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from saescope.core.activations import OutlierFilter
from saescope.core.data import batches, iter_texts
from saescope.core.errors import ParamError, SaescopeError
from saescope.core.files import atomic_write_json, read_json, temporary
from saescope.core.io.lock import holding_lock
from saescope.core.layers import parse_layers
from saescope.core.schema import REQUIRED, Config, Field, check_record, config_field, escape

CACHE_FORMAT = "saescope-activations"
CACHE_VERSION = 1
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# safetensors dtype names -> (numpy dtype of the raw bytes, torch dtype they are)
_RAW = {"BF16": (np.uint16, torch.bfloat16), "F16": (np.float16, torch.float16), "F32": (np.float32, torch.float32)}


# ---------------------------------------------------------------- reading
def _safetensors_layout(path: Path) -> tuple[dict, int]:
    """The header of a safetensors file and where its data starts."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SaescopeError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                raise SaescopeError(f"{path}: not a safetensors file (header size {n})")
            header = json.loads(f.read(n))
    except FileNotFoundError as exc:
        raise SaescopeError(f"cannot read {path}: no such file") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SaescopeError(f"cannot read {path}: not a safetensors file ({type(exc).__name__})") from exc
    if not isinstance(header, dict):
        raise SaescopeError(f"{path}: not a safetensors file (its header is not an object)")
    return header, 8 + n


def _map_tensor(path: Path, name: str = "activations") -> tuple[np.memmap, torch.dtype]:
    """The 2-D float tensor `name` of a safetensors file, memory-mapped: (raw array, the torch dtype of its bytes)."""
    header, start = _safetensors_layout(path)
    entry = header.get(name)
    if not isinstance(entry, dict):
        tensors = [k for k in header if k != "__metadata__"]
        raise SaescopeError(f"{path}: no tensor named {name!r} (it holds {', '.join(tensors) or 'none'})")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _RAW:
        raise SaescopeError(f"{path}: {name} is {dtype}; activations must be BF16, F16 or F32")
    if not isinstance(shape, list) or len(shape) != 2:
        raise SaescopeError(f"{path}: {name} has shape {shape}; activations must be (n_tokens, d_model)")
    raw, torch_dtype = _RAW[dtype]
    n, d = shape
    if n < 1 or d < 1 or offsets[1] - offsets[0] != n * d * np.dtype(raw).itemsize:
        raise SaescopeError(f"{path}: {name}'s shape {shape} does not match its bytes")
    if start + offsets[1] > path.stat().st_size:
        raise SaescopeError(f"{path}: truncated ({path.stat().st_size} bytes, its header needs {start + offsets[1]})")
    return np.memmap(path, dtype=raw, mode="r", offset=start + offsets[0], shape=(n, d)), torch_dtype


def _map_npy(path: Path) -> tuple[np.ndarray, torch.dtype]:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise SaescopeError(f"cannot read {path}: not a .npy file ({type(exc).__name__})") from exc
    if arr.ndim != 2:
        raise SaescopeError(f"{path}: activations must be (n_tokens, d_model), got shape {arr.shape}")
    if arr.dtype not in (np.float32, np.float16):
        raise SaescopeError(f"{path}: activations must be float32 or float16, got {arr.dtype}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise SaescopeError(f"{path}: holds no activations (shape {arr.shape})")
    return arr, torch.float32 if arr.dtype == np.float32 else torch.float16


def _as_tensor(raw: np.ndarray, dtype: torch.dtype) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(raw))
    return (t.view(torch.bfloat16) if dtype == torch.bfloat16 else t).float()


class ActivationSource:
    """Cached activations of one or more layers, read by token index: a `saescope cache` folder or one file."""

    def __init__(self, shards: dict[int, list[tuple[np.ndarray, torch.dtype]]], *, origin: str, model: str | None,
                 info: dict | None = None):
        self.origin, self.model, self.info = origin, model, info or {}
        self.layers = sorted(shards)
        self._shards = shards
        sizes = {n: [a.shape[0] for a, _ in s] for n, s in shards.items()}
        first = sizes[self.layers[0]]
        if any(s != first for s in sizes.values()):
            raise SaescopeError(f"{origin}: its layers hold different numbers of tokens")
        dims = {a.shape[1] for s in shards.values() for a, _ in s}
        if len(dims) != 1:
            raise SaescopeError(f"{origin}: its shards disagree on d_model ({', '.join(map(str, sorted(dims)))})")
        self.d_model = dims.pop()
        self._starts = np.cumsum([0, *first])
        self.n_tokens = int(self._starts[-1])

    def rows(self, layer: int, index: Tensor) -> Tensor:
        """float32 (len(index), d_model) activations of tokens `index` (any order) of one layer."""
        idx = index.cpu().numpy()
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        shard = np.searchsorted(self._starts, sorted_idx, side="right") - 1
        out = torch.empty(len(idx), self.d_model)
        cuts = np.flatnonzero(np.diff(shard)) + 1
        for lo, hi in zip([0, *cuts], [*cuts, len(idx)]):
            if lo == hi:
                continue
            s = int(shard[lo])
            raw, dtype = self._shards[layer][s]
            out[torch.from_numpy(order[lo:hi])] = _as_tensor(raw[sorted_idx[lo:hi] - self._starts[s]], dtype)
        return out

    def permutation(self, seed: int, epoch: int) -> Tensor:
        digest = hashlib.sha256(f"saescope-activations:{seed}:{epoch}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return torch.randperm(self.n_tokens, generator=gen)

    def positions(self, seed: int, start: int, count: int) -> Tensor:
        """Token indices at stream positions [start, start + count): pass after pass, each in its own seeded order."""
        parts, pos = [], start
        while pos < start + count:
            epoch, offset = divmod(pos, self.n_tokens)
            if getattr(self, "_perm_epoch", None) != (seed, epoch):
                self._perm, self._perm_epoch = self.permutation(seed, epoch), (seed, epoch)
            take = min(self.n_tokens - offset, start + count - pos)
            parts.append(self._perm[offset:offset + take])
            pos += take
        return torch.cat(parts)


def open_activations(spec: str | Path, *, layer: int | None = None) -> ActivationSource:
    """A `saescope cache` folder, or one .npy / .safetensors file of activations (a tensor named "activations",
    shape (n_tokens, d_model)); a file holds one layer: `layer` (default 0)."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise SaescopeError(f"activations not found: {spec}")
    if path.is_dir():
        info = read_cache_info(path)
        if info["tokens"] == 0:
            raise SaescopeError(f"{path}: the cache holds no tokens yet")
        shards = {n: [_map_tensor(path / f"layer{n}" / s["name"]) for s in info["shards"]] for n in info["layers"]}
        return ActivationSource(shards, origin=str(path), model=info["model"], info=info)
    if path.suffix == ".npy":
        mapped = _map_npy(path)
    elif path.suffix == ".safetensors":
        mapped = _map_tensor(path)
    else:
        raise SaescopeError(f"{path}: give a cache folder (saescope cache), a .npy or a .safetensors file")
    return ActivationSource({0 if layer is None else layer: [mapped]}, origin=str(path), model=None)


# ---------------------------------------------------------------- the record
SHARD = {"name": Field(str), "tokens": Field(int, min=1)}
CACHE_RECORD = {"format": Field(str), "format_version": Field(int, min=1), "model": Field(str), "d_model": Field(int, min=1),
                "layers": Field(list), "dtype": Field(str), "data": Field(str, nullable=True), "text_column": Field(str),
                "ctx_len": Field(int, min=2), "batch_size": Field(int, min=1), "seed": Field(int, min=0),
                "skip_first_token": Field(bool), "outlier_factor": Field(float, min=0), "model_dtype": Field(str),
                "max_tokens": Field(int, min=1), "tokens": Field(int, min=0), "batches_done": Field(int, min=0),
                "batch_offset": Field(int, required=False, min=0),
                "shards": Field(list), "outliers": Field(dict), "complete": Field(bool)}
WHAT_IS_CACHED = ("model", "layers", "dtype", "data", "text_column", "ctx_len", "batch_size", "seed", "skip_first_token",
                  "model_dtype")


def read_cache_info(folder: Path) -> dict:
    path = folder / "cache.json"
    if not path.is_file():
        raise SaescopeError(f"{folder}: not an activation cache (no cache.json; write one with saescope cache)")
    info = read_json(path, CACHE_RECORD)
    if info["format"] != CACHE_FORMAT:
        raise SaescopeError(f"{path}: format {info['format']!r} is not {CACHE_FORMAT!r}")
    if info["format_version"] > CACHE_VERSION:
        raise SaescopeError(f"{path}: format_version {info['format_version']}; this saescope reads up to {CACHE_VERSION}")
    if info["dtype"] not in CACHE_DTYPES:
        raise SaescopeError(f"{path}: dtype {info['dtype']!r} is not one of {', '.join(CACHE_DTYPES)}")
    if not info["layers"] or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in info["layers"]):
        raise SaescopeError(f"{path}: field 'layers' must list layer numbers")
    for i, s in enumerate(info["shards"]):
        check_record(s, SHARD, f"{path}: shards[{i}]")
    if sum(s["tokens"] for s in info["shards"]) != info["tokens"]:
        raise SaescopeError(f"{path}: the shards' tokens do not add up to field 'tokens' ({info['tokens']})")
    return info


# ---------------------------------------------------------------- writing
@dataclass(kw_only=True)
class CacheConfig(Config):
    """`saescope cache`: a model's residual activations at some layers, written once to train many SAEs from."""

    out: str = config_field(REQUIRED, "the cache folder (the same command again goes on where it stopped)", output="folder")
    model: str | None = config_field(None, "built-in name, model folder, .gguf file or hub id (default: smollm2-135m-instruct)")
    data: str | None = config_field(None, "text file, folder, hub dataset id, or an embedded corpus (default: default)")
    text_column: str = config_field("text", "for tables and JSON: the text column")
    layers: str = config_field(REQUIRED, "the layers to cache, e.g. 15 or 0,5,10-20")
    max_tokens: int = config_field(1_000_000, "tokens to cache per layer", min=1)
    ctx_len: int = config_field(256, "tokens per sequence", min=2)
    batch_size: int = config_field(8, "sequences per forward pass", min=1)
    dtype: str = config_field("bf16", "the stored dtype (bf16 halves the disk of fp32)", choices=tuple(CACHE_DTYPES))
    shard_tokens: int = config_field(65_536, "tokens per shard file", min=1)
    seed: int = config_field(0, "the data order", min=0)
    skip_first_token: bool = config_field(False, "leave out every sequence's first token (the attention sink)")
    outlier_factor: float = config_field(5.0, "count tokens with norm > factor x the running median (all are kept)", min=0)
    model_dtype: str = config_field("auto", "the LM's dtype (auto: bf16 on GPU and on CPUs measured fast at it)",
                                    choices=("auto", "fp32", "bf16", "fp16"))
    device: str = config_field("auto", "cpu, cuda or cuda:N (auto: cuda when there is one)")

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_layers(self.layers, None)

    def writes_into(self) -> Path:
        return Path(self.out)


@dataclass
class CacheResult:
    out: Path
    info: dict
    seconds: float
    tokens_written: int

    def text(self) -> str:
        i = self.info
        speed = self.tokens_written / max(self.seconds, 1e-9)
        dropped = ", ".join(f"{n}:{v}" for n, v in i["outliers"].items())
        return "\n".join([
            f"cached {i['tokens']} tokens x {len(i['layers'])} layers of {i['model']} ({i['dtype']}, {len(i['shards'])} shards) in "
            f"{self.out}; {self.tokens_written} written now in {self.seconds:.0f}s ({speed:.0f} tok/s)",
            f"tokens over the outlier filter's {i['outlier_factor']:g} x median norm (kept; training filters them): {dropped}"])


def _settings(cfg: CacheConfig, model: str, layers: list[int], model_dtype: str, d_model: int) -> dict:
    return {"format": CACHE_FORMAT, "format_version": CACHE_VERSION, "model": model, "d_model": d_model, "layers": layers,
            "dtype": cfg.dtype, "data": cfg.data, "text_column": cfg.text_column, "ctx_len": cfg.ctx_len,
            "batch_size": cfg.batch_size, "seed": cfg.seed, "skip_first_token": cfg.skip_first_token,
            "outlier_factor": float(cfg.outlier_factor), "model_dtype": model_dtype, "max_tokens": cfg.max_tokens}


def _resume_info(out: Path, settings: dict) -> dict | None:
    """The cache already in OUT when it is this one's (to go on from), None when OUT holds none; a cache of other
    settings is refused."""
    if not (out / "cache.json").exists():
        if out.is_dir() and any(p.name.startswith("layer") for p in out.iterdir()):
            raise SaescopeError(f"{out} holds layer folders but no cache.json; choose another --out")
        return None
    info = read_cache_info(out)
    for name in WHAT_IS_CACHED:
        if info[name] != settings[name]:
            raise ParamError(f"{escape(str(out))} holds a cache with {name} {escape(str(info[name]))}, not "
                             f"{escape(str(settings[name]))}; choose another {{}}", "out")
    return info


@holding_lock
def run_cache(cfg: CacheConfig) -> CacheResult:
    from saescope.core.models import capture, load_model
    from saescope.core.models.builtin import DEFAULT_MODEL
    from saescope.core.models.load import DTYPE_NAMES, resolve_device

    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    earlier = read_cache_info(out) if (out / "cache.json").exists() else None
    # `auto` goes on in the dtype the cache was started in: one cache, one dtype of the LM's activations
    lm = load_model(cfg.model, dtype=earlier["model_dtype"] if earlier and cfg.model_dtype == "auto" else cfg.model_dtype,
                    device=str(device))
    layers = parse_layers(cfg.layers, lm.n_layers)
    settings = _settings(cfg, cfg.model or DEFAULT_MODEL, layers, DTYPE_NAMES.get(lm.dtype, str(lm.dtype)), lm.d_model)
    info = _resume_info(out, settings)
    if info is None:
        info = {**settings, "tokens": 0, "batches_done": 0, "batch_offset": 0, "shards": [], "outliers": {str(n): 0 for n in layers},
                "complete": False}
    info["max_tokens"] = cfg.max_tokens
    per_token = lm.d_model * CACHE_DTYPES[cfg.dtype].itemsize * len(layers)
    need = max(0, cfg.max_tokens - info["tokens"]) * per_token
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if need > free * 0.95:
        raise SaescopeError(f"{cfg.max_tokens - info['tokens']} tokens x {len(layers)} layers x {lm.d_model} x "
                            f"{CACHE_DTYPES[cfg.dtype].itemsize} bytes need {need / 2**30:.2f} GiB; {out} has "
                            f"{free / 2**30:.2f} GiB free")
    for n in layers:  # shards of a writer killed after writing them, before cache.json named them
        named = {s["name"] for s in info["shards"]}
        for stray in (out / f"layer{n}").glob("*"):
            if stray.name not in named:
                stray.unlink()
    filters = {n: OutlierFilter(cfg.outlier_factor) for n in layers}
    pending: dict[int, list[Tensor]] = {n: [] for n in layers}
    held, written, started = 0, 0, time.perf_counter()
    bar = tqdm(total=cfg.max_tokens, initial=info["tokens"], unit="tok", unit_scale=True, desc=f"cache {len(layers)} layers",
               dynamic_ncols=True)

    def flush() -> None:
        nonlocal held, written
        if held == 0:
            return
        name = f"shard-{len(info['shards']):06d}.safetensors"
        for n in layers:
            folder = out / f"layer{n}"
            folder.mkdir(exist_ok=True)
            x = torch.cat(pending[n])[:held].to(CACHE_DTYPES[cfg.dtype]).contiguous()
            tmp = temporary(folder / name)
            save_file({"activations": x}, str(tmp))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, folder / name)
            pending[n] = []
        info["shards"].append({"name": name, "tokens": held})
        info["tokens"] += held
        written += held
        held = 0
        atomic_write_json(out / "cache.json", info)

    stream = batches(iter_texts(cfg.data, text_column=cfg.text_column), lm.tokenizer, ctx_len=cfg.ctx_len,
                     batch_size=cfg.batch_size, seed=cfg.seed, shuffle_buffer=512, skip=info["batches_done"])
    start = info.get("batch_offset", 0)  # tokens of the next batch a cache stopped inside of has already written
    try:
        for ids in stream:
            if info["tokens"] + held >= cfg.max_tokens:
                break
            acts = capture(lm.model, ids.to(lm.device), layers)
            per_batch = ids.shape[0] * (ids.shape[1] - int(cfg.skip_first_token))
            take = min(cfg.max_tokens - info["tokens"] - held, per_batch - start)
            for n in layers:
                a = acts[n][:, 1:] if cfg.skip_first_token else acts[n]
                x = a.reshape(-1, a.shape[-1])[start:start + take].float().cpu()
                info["outliers"][str(n)] += int((~filters[n].keep(x)).sum())
                pending[n].append(x)
            if start + take == per_batch:
                info["batches_done"], info["batch_offset"] = info["batches_done"] + 1, 0
            else:  # the cache ends inside this batch: a longer cache goes on from its next token
                info["batch_offset"] = start + take
            start = 0
            held += take
            bar.update(take)
            if held >= cfg.shard_tokens:
                flush()
        flush()
    finally:
        bar.close()
    info["complete"] = info["tokens"] >= cfg.max_tokens
    atomic_write_json(out / "cache.json", info)
    if info["tokens"] == 0:
        raise ParamError("the dataset is too small for one batch: lower {}/{} or add data", "ctx_len", "batch_size")
    return CacheResult(out, info, time.perf_counter() - started, written)

