"""Every SAE file format saescope reads or writes: one reader and one writer per format.

All readers return SAEs of any kind (saescope.core.sae.SAE_KINDS) in saescope's convention (see
saescope.core.sae.base): W_enc (d_sae, d_model), W_dec (d_sae, d_model), no b_dec subtraction before the encoder.
Formats that subtract b_dec first (sparsify, SAELens with apply_b_dec_to_input) are folded exactly:
b_enc' = b_enc - W_enc @ b_dec (a threshold compares the same pre-activation, so it folds too).

- saescope:    layer{n}.safetensors + layer{n}.json (format_version 2: "kind", and the kind's tensors: "threshold" of
               batchtopk / matryoshka (1,) and jumprelu (d_sae,), gated's b_gate / r_mag / b_mag; version 1 is top-k)
- qwen-scope:  layer{n}.sae.pt, a torch dict W_enc (d_sae, d_model), W_dec (d_model, d_sae), b_enc, b_dec (top-k)
- saelens:     cfg.json + sae_weights.safetensors (W_enc (d_in, d_sae), W_dec (d_sae, d_in)); architectures "topk",
               "jumprelu" (threshold; SAELens saves BatchTopK this way too), "standard" (ReLU, or legacy top-k), "gated"
- gemma-scope: params.npz (W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc, b_dec, threshold): JumpReLU, the file itself
               or a folder of layer_{n}/.../params.npz
- sparsify:    cfg.json + sae.safetensors (encoder.weight, encoder.bias, W_dec, b_dec), folder layers.{n} (top-k)
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
from saescope.core.sae import SAE, SAE_KINDS, SAEConfig, make_sae
from saescope.core.schema import Field, check_record

FORMAT_VERSION = 2  # 2: the SAE's kind and its own tensors (a threshold)


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


def _extra_shapes(kind: str, d_sae: int) -> dict[str, tuple[int, ...]]:
    """The tensors a kind holds beside the four weights, and their shapes."""
    return {"batchtopk": {"threshold": (1,)}, "matryoshka": {"threshold": (1,)}, "jumprelu": {"threshold": (d_sae,)},
            "gated": {"b_gate": (d_sae,), "r_mag": (d_sae,), "b_mag": (d_sae,)}}.get(kind, {})


def from_weights(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int, *, kind: str = "topk",
                 extra: dict[str, Tensor] | None = None, subtract_b_dec: bool = False, origin: str = "") -> SAE:
    """Build an SAE of `kind` from weights in saescope layout (and the kind's own tensors, `extra`), checking every shape,
    k and that every weight is finite (a threshold may be NaN: a control's, which has none)."""
    if kind not in SAE_KINDS:
        raise SaescopeError(f"{origin}: unknown SAE kind {kind!r} (known: {', '.join(SAE_KINDS)})")
    for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise SaescopeError(f"{origin}: {name} is not a float tensor ({type(t).__name__})")
    if W_enc.ndim != 2:
        raise SaescopeError(f"{origin}: W_enc must be a matrix, got shape {tuple(W_enc.shape)}")
    d_sae, d_model = W_enc.shape
    expected = {"b_enc": (b_enc, (d_sae,)), "W_dec": (W_dec, (d_sae, d_model)), "b_dec": (b_dec, (d_model,))}
    extra = dict(extra or {})
    for name, shape in _extra_shapes(kind, d_sae).items():
        if name not in extra:
            raise SaescopeError(f"{origin}: a {kind} SAE needs its {name}, which is missing")
        if not isinstance(extra[name], Tensor) or not extra[name].is_floating_point():
            raise SaescopeError(f"{origin}: {name} is not a float tensor")
        expected[name] = (extra[name], shape)
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise SaescopeError(f"{origin}: {name} has shape {tuple(t.shape)}, expected {shape} for W_enc {tuple(W_enc.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_sae:
        raise SaescopeError(f"{origin}: k must be an integer in 1..{d_sae} (d_sae), got {k!r}")
    for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec), *extra.items()):
        finite = torch.isfinite(t) | (torch.isnan(t) if name == "threshold" else torch.zeros_like(t, dtype=torch.bool))
        if not finite.all():
            raise SaescopeError(f"{origin}: {name} holds NaN or infinite values")
        if name == "threshold" and (t < 0).any():
            raise SaescopeError(f"{origin}: threshold holds negative values")
        if name == "threshold" and torch.isnan(t).any() and not torch.isnan(t).all():
            # a control has no threshold at all (every entry NaN); a learned one with holes is damage, not a control
            raise SaescopeError(f"{origin}: threshold holds NaN for some latents but not all")
    sae = make_sae(SAEConfig(d_model=d_model, d_sae=d_sae, k=int(k), kind=kind))
    with torch.no_grad():
        W_enc, b_enc, W_dec, b_dec = (t.detach().float() for t in (W_enc, b_enc, W_dec, b_dec))
        if subtract_b_dec:
            b_enc = b_enc - W_enc @ b_dec
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)
        sae.load_extra({n: v.detach().float() for n, v in extra.items()})
    return sae


# ---------------------------------------------------------------- saescope (native)
def save_native(sae: SAE, folder: Path, layer: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: getattr(sae, n).detach().float().contiguous().cpu() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    tensors["b_enc"] = sae.saved_b_enc().detach().float().contiguous().cpu()
    tensors.update({n: v.float().contiguous().cpu() for n, v in sae.extra_tensors().items()})
    tmp = temporary(folder / f"layer{layer}.safetensors")
    save_file(tensors, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, folder / f"layer{layer}.safetensors")
    cfg = {"format": "saescope", "format_version": FORMAT_VERSION, "kind": sae.cfg.kind, "d_model": sae.cfg.d_model,
           "d_sae": sae.cfg.d_sae, "k": sae.cfg.k, "layer": layer, **{k: v for k, v in sae.meta.items() if k != "layer"}}
    atomic_write_json(folder / f"layer{layer}.json", cfg)


# A layer record, strictly: what save_native writes is what load_native requires (records from before a field was
# written lack only it: format_version before version 1, the kind before version 2, which were all top-k); `model` may
# be null or absent (an SAE converted from a format that does not say).
NATIVE_CONFIG = {"format_version": Field(int, required=False, min=0), "k": Field(int, min=1), "d_model": Field(int, min=1),
                 "d_sae": Field(int, min=1), "layer": Field(int, min=0), "model": Field(str, required=False, nullable=True),
                 "kind": Field(str, required=False)}


def load_native(folder: Path, layer: int) -> SAE:
    cfg = read_json(folder / f"layer{layer}.json", NATIVE_CONFIG)
    version = cfg.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise SaescopeError(f"{folder}/layer{layer}.json has format_version {version}; this saescope reads up to {FORMAT_VERSION}")
    if version >= 2 and "kind" not in cfg:
        raise SaescopeError(f"{folder}/layer{layer}.json: field 'kind' is missing")
    kind = cfg.get("kind", "topk")
    t = _read_safetensors(folder / f"layer{layer}.safetensors", ("W_enc", "b_enc", "W_dec", "b_dec"))
    extra = {n: v for n, v in t.items() if n not in ("W_enc", "b_enc", "W_dec", "b_dec")}
    sae = from_weights(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], cfg["k"], kind=kind, extra=extra,
                       origin=f"{folder}/layer{layer}")
    for dim in ("d_model", "d_sae"):
        if cfg[dim] != getattr(sae.cfg, dim):
            raise SaescopeError(f"{folder}/layer{layer}.json: {dim} {cfg[dim]} does not match the weights' {getattr(sae.cfg, dim)}")
    if cfg["layer"] != layer:
        raise SaescopeError(f"{folder}/layer{layer}.json: field 'layer' is {cfg['layer']}, but the file is layer{layer}")
    sae.meta = {k: v for k, v in cfg.items() if k not in ("format", "format_version", "d_model", "d_sae", "k", "kind")}
    sae.meta["origin"] = "saescope"
    return sae


# ---------------------------------------------------------------- Qwen-Scope
def save_qwen_scope(sae: SAE, folder: Path, layer: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {"W_enc": sae.W_enc.detach().float().cpu().clone(), "W_dec": sae.W_dec.detach().float().cpu().T.contiguous(),
             "b_enc": sae.saved_b_enc().detach().float().cpu().clone(), "b_dec": sae.b_dec.detach().float().cpu().clone()}
    tmp = temporary(folder / f"layer{layer}.sae.pt")
    torch.save(state, tmp)
    os.replace(tmp, folder / f"layer{layer}.sae.pt")


def qwen_scope_k(folder: Path | str) -> int | None:
    """k from a Qwen-Scope repo or folder name such as SAE-Res-Qwen3-1.7B-Base-W32K-L0_50."""
    m = re.search(r"L0_(\d+)", str(folder))
    return int(m.group(1)) if m else None


def load_qwen_scope(path: Path, k: int | None = None) -> SAE:
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
SAELENS_ARCHITECTURE = {"topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu", "matryoshka": "jumprelu",
                        "relu": "standard"}


def save_saelens(sae: SAE, folder: Path, *, hook_name: str, model_name: str = "") -> None:
    """SAELens's own inference format: top-k as "topk"; JumpReLU as "jumprelu"; BatchTopK and Matryoshka as "jumprelu"
    with their one threshold for every latent (how SAELens saves its own BatchTopK); a control of those (no threshold)
    as "topk" at its k; ReLU as "standard"."""
    kind = sae.cfg.kind
    if kind not in SAELENS_ARCHITECTURE:
        raise SaescopeError(f"a {kind} SAE has no SAELens export here (SAELens reads topk, jumprelu, batchtopk, matryoshka, relu)")
    threshold = sae.extra_tensors().get("threshold")
    arch = SAELENS_ARCHITECTURE[kind]
    if threshold is not None and not torch.isfinite(threshold).all():
        arch = "topk"  # a control: no learned threshold, each token's k largest
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": sae.W_enc.detach().float().cpu().T.contiguous(), "W_dec": sae.W_dec.detach().float().cpu().contiguous(),
               "b_enc": sae.saved_b_enc().detach().float().cpu().contiguous(), "b_dec": sae.b_dec.detach().float().cpu().contiguous()}
    if arch == "jumprelu":
        tensors["threshold"] = threshold.float().cpu().expand(sae.cfg.d_sae).contiguous()
    tmp = temporary(folder / "sae_weights.safetensors")
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / "sae_weights.safetensors")
    cfg = {"architecture": arch, "d_in": sae.cfg.d_model, "d_sae": sae.cfg.d_sae, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
           "reshape_activations": "none", "rescale_acts_by_decoder_norm": False,
           "metadata": {"hook_name": hook_name, "model_name": model_name, "exported_by": "saescope", "saescope_kind": kind,
                        "saescope_k": sae.cfg.k}}
    if arch == "topk":
        cfg["k"] = sae.cfg.k
    atomic_write_json(folder / "cfg.json", cfg)


_OPTIONAL_STR, _OPTIONAL_DICT = Field(str, required=False, nullable=True), Field(dict, required=False, nullable=True)
SAELENS_CONFIG = {"architecture": Field(str, required=False), "normalize_activations": _OPTIONAL_STR, "metadata": _OPTIONAL_DICT,
                  "hook_name": _OPTIONAL_STR, "model_name": _OPTIONAL_STR, "activation_fn_kwargs": _OPTIONAL_DICT,
                  "apply_b_dec_to_input": Field(bool, required=False), "rescale_acts_by_decoder_norm": Field(bool, required=False),
                  "d_in": Field(int, required=False, min=1), "d_sae": Field(int, required=False, min=1)}


def _saelens_kind(cfg: dict, folder: Path) -> str:
    arch = cfg.get("architecture", "")
    if arch == "standard":
        fn = cfg.get("activation_fn_str", cfg.get("activation_fn")) or "relu"
        if fn not in ("relu", "topk"):
            raise SaescopeError(f"{folder}: SAELens standard SAE with activation {fn!r}: only relu and topk are read")
        return "topk" if fn == "topk" else "relu"
    kinds = {"topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu", "gated": "gated"}
    if arch not in kinds:
        raise SaescopeError(f"{folder}: SAELens architecture {arch!r} is not read here (topk, jumprelu, batchtopk, standard, "
                            "gated are)")
    return kinds[arch]


def load_saelens(folder: Path, k: int | None = None) -> SAE:
    """A SAELens SAE folder, for inference. k, where the format does not record one (ReLU, JumpReLU, gated): the one
    given, the L0 saescope recorded on export, the 'average_l0_N' of its path, else d_sae (no cap)."""
    cfg = read_json(folder / "cfg.json", SAELENS_CONFIG)
    check_record(cfg.get("metadata") or {}, {"hook_name": _OPTIONAL_STR, "model_name": _OPTIONAL_STR}, f"{folder}/cfg.json metadata")
    kind = _saelens_kind(cfg, folder)
    if cfg.get("normalize_activations", "none") != "none":
        raise SaescopeError(f"{folder}: input normalisation {cfg['normalize_activations']!r} is not supported")
    kwargs = cfg.get("activation_fn_kwargs")
    metadata = cfg.get("metadata") or {}
    k = cfg.get("k") or (kwargs.get("k") if isinstance(kwargs, dict) else None) or k or metadata.get("saescope_k")
    if kind == "topk" and not k:
        raise SaescopeError(f"{folder}/cfg.json gives no k")
    names = {"topk": (), "relu": (), "jumprelu": ("threshold",), "gated": ("b_gate", "r_mag", "b_mag")}[kind]
    t = _read_safetensors(folder / "sae_weights.safetensors", ("W_enc", "W_dec", "b_dec", *names,
                                                              *(("b_enc",) if kind != "gated" else ())))
    W_enc, W_dec = t["W_enc"].T, t["W_dec"]
    b_enc = t["b_enc"] if kind != "gated" else torch.zeros(W_enc.shape[0])  # gated: the fold alone (b_gate, b_mag add)
    extra = {n: t[n] for n in names}
    if cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens scales pre-activations by ||W_dec[i]|| and decodes with unit rows; folding the norms into the
        # encoder gives the same codes and reconstructions exactly.
        if kind != "topk":
            raise SaescopeError(f"{folder}: rescale_acts_by_decoder_norm is read for top-k SAEs only")
        norm = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * norm[:, None], b_enc * norm, W_dec / norm[:, None]
    d_sae = W_enc.shape[0] if W_enc.ndim == 2 else 0
    if not k:
        m = re.search(r"(?:average_l0|l0)_(\d+)", str(folder))
        k = int(m.group(1)) if m and 1 <= int(m.group(1)) <= d_sae else max(d_sae, 1)
    sae = from_weights(W_enc, b_enc, W_dec, t["b_dec"], int(k), kind=kind, extra=extra,
                       subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", True)), origin=str(folder))
    for cfg_dim, dim in (("d_in", "d_model"), ("d_sae", "d_sae")):
        if cfg_dim in cfg and cfg[cfg_dim] != getattr(sae.cfg, dim):
            raise SaescopeError(f"{folder}/cfg.json: {cfg_dim} {cfg[cfg_dim]} does not match the weights' {getattr(sae.cfg, dim)}")
    hook = metadata.get("hook_name") or cfg.get("hook_name") or ""
    m = re.search(r"(?:layers\.|blocks\.)(\d+)", hook)
    model = metadata.get("model_name") or cfg.get("model_name")
    sae.meta = {"origin": "saelens", "hook_name": hook, **({"layer": int(m.group(1))} if m else {}),
                **({"model": model} if model else {})}
    return sae


# ---------------------------------------------------------------- Gemma Scope
GEMMA_SCOPE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def load_gemma_scope(path: Path, k: int | None = None) -> SAE:
    """A Gemma Scope params.npz: a JumpReLU SAE, W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc, b_dec, threshold (no
    b_dec subtraction). k: the one given, else the 'average_l0_N' of its path, else d_sae (no cap)."""
    import zipfile
    import zlib

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise SaescopeError(f"cannot read {path}: not a readable .npz file ({type(exc).__name__})") from exc
    missing = [n for n in GEMMA_SCOPE_KEYS if n not in arrays]
    if missing:
        raise SaescopeError(f"{path}: a Gemma Scope params.npz holds {', '.join(GEMMA_SCOPE_KEYS)}; {', '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} missing")
    t = {}
    for name in GEMMA_SCOPE_KEYS:
        if arrays[name].dtype.kind != "f":
            raise SaescopeError(f"{path}: {name} is not a float array ({arrays[name].dtype})")
        t[name] = torch.from_numpy(arrays[name].astype("float32"))
    if t["W_enc"].ndim != 2:
        raise SaescopeError(f"{path}: W_enc must be a matrix, got shape {tuple(t['W_enc'].shape)}")
    d_sae = t["W_enc"].shape[1]
    if not k:
        m = re.search(r"average_l0_(\d+)", str(path))
        k = int(m.group(1)) if m and 1 <= int(m.group(1)) <= d_sae else d_sae
    sae = from_weights(t["W_enc"].T, t["b_enc"], t["W_dec"], t["b_dec"], int(k), kind="jumprelu",
                       extra={"threshold": t["threshold"]}, origin=str(path))
    m = re.search(r"layer_(\d+)", str(path))
    sae.meta = {"origin": "gemma-scope", **({"layer": int(m.group(1))} if m else {})}
    return sae


# ---------------------------------------------------------------- sparsify
def load_sparsify(folder: Path) -> SAE:
    cfg = read_json(folder / "cfg.json", {"k": Field(int, min=1), "activation": Field(str, required=False)})
    if cfg.get("activation", "topk") != "topk" or cfg.get("transcode") or cfg.get("skip_connection"):
        raise SaescopeError(f"{folder}: only plain top-k sparsify SAEs are supported (no transcoders or skip connections)")
    t = _read_safetensors(folder / "sae.safetensors", ("encoder.weight", "encoder.bias", "W_dec", "b_dec"))
    sae = from_weights(t["encoder.weight"], t["encoder.bias"], t["W_dec"], t["b_dec"], cfg["k"],
                       subtract_b_dec=True, origin=str(folder))
    m = re.search(r"layers[._](\d+)", folder.name)
    sae.meta = {"origin": "sparsify", **({"layer": int(m.group(1))} if m else {})}
    return sae
