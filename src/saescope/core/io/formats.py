"""Every SAE file format saescope reads or writes: one reader and one writer per format.

All readers return TopKSAE in saescope's convention (see saescope.core.sae.topk): W_enc (d_sae, d_model),
W_dec (d_sae, d_model), no b_dec subtraction before the encoder. Formats that subtract b_dec first
(sparsify, SAELens with apply_b_dec_to_input) are folded exactly: b_enc' = b_enc - W_enc @ b_dec.

- saescope:   layer{n}.safetensors + layer{n}.json  (format_version 1)
- qwen-scope: layer{n}.sae.pt, a torch dict W_enc (d_sae, d_model), W_dec (d_model, d_sae), b_enc, b_dec
- saelens:    cfg.json + sae_weights.safetensors (W_enc (d_in, d_sae), W_dec (d_sae, d_in)), architecture "topk"
- sparsify:   cfg.json + sae.safetensors (encoder.weight, encoder.bias, W_dec, b_dec), folder layers.{n}
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from saescope.core.errors import SaescopeError
from saescope.core.files import atomic_write_json, read_json, temporary
from saescope.core.sae import SAEConfig, TopKSAE
from saescope.core.schema import Field, check_record

FORMAT_VERSION = 1


def _read_safetensors(path: Path, names: tuple[str, ...] = ()) -> dict[str, Tensor]:
    try:
        tensors = load_file(str(path))
    except FileNotFoundError as exc:
        raise SaescopeError(f"cannot read {path}: no such file") from exc
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SaescopeError(f"cannot read {path}: corrupt or truncated safetensors file") from exc
    if missing := sorted(set(names) - set(tensors)):
        raise SaescopeError(f"{path} lacks {', '.join(missing)}")
    return tensors


def from_weights(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int, *,
                 subtract_b_dec: bool = False, origin: str = "") -> TopKSAE:
    """Build a TopKSAE from weights in saescope layout, checking every shape, k and that every weight is finite."""
    for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise SaescopeError(f"{origin}: {name} is not a float tensor ({type(t).__name__})")
    if W_enc.ndim != 2:
        raise SaescopeError(f"{origin}: W_enc must be a matrix, got shape {tuple(W_enc.shape)}")
    d_sae, d_model = W_enc.shape
    expected = {"b_enc": (b_enc, (d_sae,)), "W_dec": (W_dec, (d_sae, d_model)), "b_dec": (b_dec, (d_model,))}
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise SaescopeError(f"{origin}: {name} has shape {tuple(t.shape)}, expected {shape} for W_enc {tuple(W_enc.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_sae:
        raise SaescopeError(f"{origin}: k must be an integer in 1..{d_sae} (d_sae), got {k!r}")
    for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
        if not torch.isfinite(t).all():
            raise SaescopeError(f"{origin}: {name} holds NaN or infinite values")
    sae = TopKSAE(SAEConfig(d_model=d_model, d_sae=d_sae, k=int(k)))
    with torch.no_grad():
        W_enc, b_enc, W_dec, b_dec = (t.detach().float() for t in (W_enc, b_enc, W_dec, b_dec))
        if subtract_b_dec:
            b_enc = b_enc - W_enc @ b_dec
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)
    return sae


# ---------------------------------------------------------------- saescope (native)
def save_native(sae: TopKSAE, folder: Path, layer: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: getattr(sae, n).detach().float().contiguous().cpu() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    tmp = temporary(folder / f"layer{layer}.safetensors")
    save_file(tensors, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, folder / f"layer{layer}.safetensors")
    cfg = {"format": "saescope", "format_version": FORMAT_VERSION, "d_model": sae.cfg.d_model,
           "d_sae": sae.cfg.d_sae, "k": sae.cfg.k, "layer": layer, **{k: v for k, v in sae.meta.items() if k != "layer"}}
    atomic_write_json(folder / f"layer{layer}.json", cfg)


# A layer record, strictly: what save_native writes is what load_native requires (format_version 0, the records from
# before it was written, lack only it); `model` may be null or absent (an SAE converted from a format that does not say).
NATIVE_CONFIG = {"format_version": Field(int, required=False, min=0), "k": Field(int, min=1), "d_model": Field(int, min=1),
                 "d_sae": Field(int, min=1), "layer": Field(int, min=0), "model": Field(str, required=False, nullable=True)}


def load_native(folder: Path, layer: int) -> TopKSAE:
    cfg = read_json(folder / f"layer{layer}.json", NATIVE_CONFIG)
    version = cfg.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise SaescopeError(f"{folder}/layer{layer}.json has format_version {version}; this saescope reads up to {FORMAT_VERSION}")
    t = _read_safetensors(folder / f"layer{layer}.safetensors", ("W_enc", "b_enc", "W_dec", "b_dec"))
    sae = from_weights(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], cfg["k"], origin=f"{folder}/layer{layer}")
    for dim in ("d_model", "d_sae"):
        if cfg[dim] != getattr(sae.cfg, dim):
            raise SaescopeError(f"{folder}/layer{layer}.json: {dim} {cfg[dim]} does not match the weights' {getattr(sae.cfg, dim)}")
    if cfg["layer"] != layer:
        raise SaescopeError(f"{folder}/layer{layer}.json: field 'layer' is {cfg['layer']}, but the file is layer{layer}")
    sae.meta = {k: v for k, v in cfg.items() if k not in ("format", "format_version", "d_model", "d_sae", "k")}
    sae.meta["origin"] = "saescope"
    return sae


# ---------------------------------------------------------------- Qwen-Scope
def save_qwen_scope(sae: TopKSAE, folder: Path, layer: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {"W_enc": sae.W_enc.detach().float().cpu().clone(), "W_dec": sae.W_dec.detach().float().cpu().T.contiguous(),
             "b_enc": sae.b_enc.detach().float().cpu().clone(), "b_dec": sae.b_dec.detach().float().cpu().clone()}
    tmp = temporary(folder / f"layer{layer}.sae.pt")
    torch.save(state, tmp)
    os.replace(tmp, folder / f"layer{layer}.sae.pt")


def qwen_scope_k(folder: Path | str) -> int | None:
    """k from a Qwen-Scope repo or folder name such as SAE-Res-Qwen3-1.7B-Base-W32K-L0_50."""
    m = re.search(r"L0_(\d+)", str(folder))
    return int(m.group(1)) if m else None


def load_qwen_scope(path: Path, k: int | None = None) -> TopKSAE:
    k = k or qwen_scope_k(path.parent.name) or qwen_scope_k(path)
    if k is None:
        raise SaescopeError(f"{path}: k is not in the folder name (…-L0_{{k}}); pass k explicitly (--k)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad or unsafe pickle
        raise SaescopeError(f"cannot read {path}: corrupt, truncated or not a plain tensor dict ({type(exc).__name__})") from exc
    if not isinstance(state, dict) or not {"W_enc", "W_dec", "b_enc", "b_dec"} <= set(state):
        raise SaescopeError(f"{path}: expected a dict with W_enc, W_dec, b_enc, b_dec")
    if not all(isinstance(state[n], Tensor) for n in ("W_enc", "W_dec", "b_enc", "b_dec")):
        raise SaescopeError(f"{path}: W_enc, W_dec, b_enc and b_dec must all be tensors")
    W_dec = state["W_dec"]
    # The format stores W_dec as (d_model, d_sae); some files hold (d_sae, d_model). Shapes tell them apart unless the
    # SAE is square, where the format's own layout is the reading (guessing would silently transpose it).
    if state["W_enc"].ndim == 2 and W_dec.ndim == 2 and W_dec.shape[0] == state["W_enc"].shape[1]:
        W_dec = W_dec.T
    sae = from_weights(state["W_enc"], state["b_enc"], W_dec, state["b_dec"], k, origin=str(path))
    sae.meta = {"origin": "qwen-scope", "layer": int(re.search(r"layer(\d+)", path.name).group(1))}
    return sae


# ---------------------------------------------------------------- SAELens
def save_saelens(sae: TopKSAE, folder: Path, *, hook_name: str, model_name: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": sae.W_enc.detach().float().cpu().T.contiguous(), "W_dec": sae.W_dec.detach().float().cpu().contiguous(),
               "b_enc": sae.b_enc.detach().float().cpu().contiguous(), "b_dec": sae.b_dec.detach().float().cpu().contiguous()}
    tmp = temporary(folder / "sae_weights.safetensors")
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / "sae_weights.safetensors")
    cfg = {"architecture": "topk", "d_in": sae.cfg.d_model, "d_sae": sae.cfg.d_sae, "k": sae.cfg.k, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
           "reshape_activations": "none", "rescale_acts_by_decoder_norm": False,
           "metadata": {"hook_name": hook_name, "model_name": model_name, "exported_by": "saescope"}}
    atomic_write_json(folder / "cfg.json", cfg)


_OPTIONAL_STR, _OPTIONAL_DICT = Field(str, required=False, nullable=True), Field(dict, required=False, nullable=True)
SAELENS_CONFIG = {"architecture": Field(str, required=False), "normalize_activations": _OPTIONAL_STR, "metadata": _OPTIONAL_DICT,
                  "hook_name": _OPTIONAL_STR, "model_name": _OPTIONAL_STR, "activation_fn_kwargs": _OPTIONAL_DICT,
                  "apply_b_dec_to_input": Field(bool, required=False), "rescale_acts_by_decoder_norm": Field(bool, required=False),
                  "d_in": Field(int, required=False, min=1), "d_sae": Field(int, required=False, min=1)}


def load_saelens(folder: Path) -> TopKSAE:
    cfg = read_json(folder / "cfg.json", SAELENS_CONFIG)
    check_record(cfg.get("metadata") or {}, {"hook_name": _OPTIONAL_STR, "model_name": _OPTIONAL_STR}, f"{folder}/cfg.json metadata")
    arch = cfg.get("architecture", "")
    if arch not in ("topk", "standard") or (arch == "standard" and cfg.get("activation_fn_str", cfg.get("activation_fn")) != "topk"):
        raise SaescopeError(f"{folder}: SAELens architecture {arch!r} is not a top-k SAE")
    if cfg.get("normalize_activations", "none") != "none":
        raise SaescopeError(f"{folder}: input normalisation {cfg['normalize_activations']!r} is not supported")
    kwargs = cfg.get("activation_fn_kwargs")
    k = cfg.get("k") or (kwargs.get("k") if isinstance(kwargs, dict) else None)
    if not k:
        raise SaescopeError(f"{folder}/cfg.json gives no k")
    t = _read_safetensors(folder / "sae_weights.safetensors", ("W_enc", "b_enc", "W_dec", "b_dec"))
    W_enc, b_enc, W_dec = t["W_enc"].T, t["b_enc"], t["W_dec"]
    if cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens scales pre-activations by ||W_dec[i]|| and decodes with unit rows; folding the norms into the
        # encoder gives the same codes and reconstructions exactly.
        norm = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * norm[:, None], b_enc * norm, W_dec / norm[:, None]
    sae = from_weights(W_enc, b_enc, W_dec, t["b_dec"], k,
                       subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", True)), origin=str(folder))
    for cfg_dim, dim in (("d_in", "d_model"), ("d_sae", "d_sae")):
        if cfg_dim in cfg and cfg[cfg_dim] != getattr(sae.cfg, dim):
            raise SaescopeError(f"{folder}/cfg.json: {cfg_dim} {cfg[cfg_dim]} does not match the weights' {getattr(sae.cfg, dim)}")
    hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name") or ""
    m = re.search(r"(?:layers\.|blocks\.)(\d+)", hook)
    model = (cfg.get("metadata") or {}).get("model_name") or cfg.get("model_name")
    sae.meta = {"origin": "saelens", "hook_name": hook, **({"layer": int(m.group(1))} if m else {}),
                **({"model": model} if model else {})}
    return sae


# ---------------------------------------------------------------- sparsify
def load_sparsify(folder: Path) -> TopKSAE:
    cfg = read_json(folder / "cfg.json", {"k": Field(int, min=1), "activation": Field(str, required=False)})
    if cfg.get("activation", "topk") != "topk" or cfg.get("transcode") or cfg.get("skip_connection"):
        raise SaescopeError(f"{folder}: only plain top-k sparsify SAEs are supported (no transcoders or skip connections)")
    t = _read_safetensors(folder / "sae.safetensors", ("encoder.weight", "encoder.bias", "W_dec", "b_dec"))
    sae = from_weights(t["encoder.weight"], t["encoder.bias"], t["W_dec"], t["b_dec"], cfg["k"],
                       subtract_b_dec=True, origin=str(folder))
    m = re.search(r"layers[._](\d+)", folder.name)
    sae.meta = {"origin": "sparsify", **({"layer": int(m.group(1))} if m else {})}
    return sae
