"""The feature store: one pass over a corpus that records, per layer and feature, what the feature does.

On disk (FOLDER, by default SAES/features/), format "saescope-features" version 1:

    store.json                 settings, layers, per-layer SAE fingerprints, tokens seen, histogram edges
    tokens.json                {token id: text} for every token the contexts and logit lists use
    layer{n}.safetensors       one file per layer, each tensor one row per feature (d = d_sae):
        fire_count   int64 (d,)          tokens on which the feature fired (activation > 0)
        act_sum      float64 (d,)        sum of its activations; mean when firing = act_sum / fire_count
        hist         int64 (d, bins)     activations when firing, in log-spaced bins (edges in store.json)
        top_acts     float32 (d, N)      the N highest per-sequence maxima, descending; 0 = no context
        top_tokens   int32 (d, N, W)     token windows around each maximum; the max token is at index `left`
                                         (store.json), -1 pads windows cut by a sequence edge
        top_source   int64 (d, N)        chunk * ctx_len + position of each maximum in the corpus stream
        logit_top_ids / logit_top_vals, logit_bottom_ids / logit_bottom_vals   int32 / float32 (d, L)
                                         tokens the decoder direction promotes / suppresses most (logit lens
                                         through the final norm and unembedding)
        expert_counts int64 (d, E)       MoE models: firings per expert the token was routed to
        expert_tokens int64 (E,)         MoE models: tokens routed to each expert (the base rate)

Every tensor is read by rows with safetensors slicing: one feature of a 64K x 40-layer store costs a few
kilobytes to show. While building, memory holds the per-layer statistics only (a fixed size: it does not grow
with the corpus); the batch loop returns freed heap to the OS. A partial build checkpoints to FOLDER/partial
and `resume=True` continues it exactly.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import Tensor
from tqdm.auto import tqdm

from saescope.core.activations import OutlierFilter
from saescope.core.data import batches, iter_texts
from saescope.core.errors import ParamError, SaescopeError
from saescope.core.files import atomic_write_bytes, atomic_write_json, read_json
from saescope.core.io import fingerprint
from saescope.core.models import LoadedModel, capture, moe_shape, record_routing, token_strings, unembedding
from saescope.core.sae import SAE, SparseCode
from saescope.core.sae.fast import screens, shortlist_rerank, top_k
from saescope.core.schema import Config, Field, check_dataclass, check_record, config_field, escape
from saescope.core.system import peak_rss_mb, release_heap

FORMAT = "saescope-features"
VERSION = 1
HIST_EDGES = [round(10 ** (e / 8), 6) for e in range(-24, 25)]  # 1e-3 .. 1e3, 8 bins per decade, open ends


@dataclass(kw_only=True)
class StoreConfig(Config):
    """What a feature store records and from which text. The fields with help are `saescope features build`'s flags."""

    data: str | None = config_field(None, "corpus (default: the embedded corpus)")
    text_column: str = config_field("text", "for tables and JSON: the text column")
    max_tokens: int = config_field(200_000, "tokens read", min=1)
    ctx_len: int = config_field(128, "tokens per sequence", min=2)
    batch_size: int = config_field(8, "sequences per batch", min=1)
    top_n: int = config_field(16, "top contexts kept per feature", min=1)
    checkpoint_every: int = config_field(50, "batches between checkpoints (resume continues from the last)", min=1)
    left: int = 12  # tokens shown before the max token
    right: int = 4  # and after it
    logit_k: int = 10
    outlier_factor: float = 5.0
    split: str = "train"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.logit_k < 1:
            raise ParamError(f"{{}} must be >= 1, got {self.logit_k}", "logit_k")
        if self.left < 0 or self.right < 0:
            raise SaescopeError("context window sizes must be >= 0")

    @property
    def window(self) -> int:
        return self.left + 1 + self.right

    @property
    def n_batches(self) -> int:
        return math.ceil(self.max_tokens / (self.ctx_len * self.batch_size))


LENS_SHORTLIST = 16  # extra candidates per side the bf16 screen hands to the fp32 ranking


@torch.no_grad()
def logit_lens(model, directions: Tensor, k: int, chunk: int = 256) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per direction (rows of `directions`), the k tokens it promotes most and the k it suppresses most through the
    model's final norm and unembedding: (top ids int32, their logits, bottom ids int32, their logits).

    On a CPU where the SAE encoder screens in bf16 (saescope.core.sae.fast.screens), so does this: the bf16 product
    shortlists k + 16 tokens per side, whose logits are recomputed in fp32 (the vocabulary-wide product is most
    of a feature store's build otherwise). Soft-capping is monotone, so it applies after the ranking. Rows go
    `chunk` at a time: (chunk x vocab) logits, never (directions x vocab)."""
    norm, head, softcap = unembedding(model)
    W = head.weight.detach()
    bias = getattr(head, "bias", None)
    k = min(k, W.shape[0])
    # a few rows (the web app's one feature) would spend more on the bf16 copy of the unembedding than they save
    screen = (directions.shape[0] >= 64 and screens(directions.device, torch.float32) and bias is None
              and W.dtype == torch.float32)
    if screen:
        W16, W32, zeros = W.bfloat16(), W.contiguous(), directions.new_zeros(W.shape[0], dtype=torch.float32)
    parts = []
    for start in range(0, directions.shape[0], chunk):
        h = norm(directions[start : start + chunk].detach().to(W.dtype)).float()
        if screen:
            logits = (h.bfloat16() @ W16.T).float()
            hi_vals, hi_ids = shortlist_rerank(logits, h.contiguous(), W32, zeros, k, k + LENS_SHORTLIST)
            lo_vals, lo_ids = shortlist_rerank(logits.neg_(), (-h).contiguous(), W32, zeros, k, k + LENS_SHORTLIST)
        else:
            logits = (h.to(W.dtype) @ W.T if bias is None else head(h.to(W.dtype))).float()
            hi_vals, hi_ids = top_k(logits, k)
            lo_vals, lo_ids = top_k(logits.neg_(), k)
        lo_vals = -lo_vals
        hi_order, lo_order = hi_vals.argsort(1, descending=True), lo_vals.argsort(1)
        hi_vals, hi_ids = hi_vals.gather(1, hi_order), hi_ids.gather(1, hi_order)
        lo_vals, lo_ids = lo_vals.gather(1, lo_order), lo_ids.gather(1, lo_order)
        if softcap:
            hi_vals, lo_vals = (softcap * (v / softcap).tanh() for v in (hi_vals, lo_vals))
        parts.append((hi_ids.int(), hi_vals, lo_ids.int(), lo_vals))
    return tuple(torch.cat(col) for col in zip(*parts))  # type: ignore[return-value]


class LayerStats:
    """Running statistics of one layer's features; `update` folds in one batch, all on the SAE's device."""

    def __init__(self, d_sae: int, cfg: StoreConfig, device: torch.device, n_experts: int = 0):
        self.d, self.cfg, self.n_experts = d_sae, cfg, n_experts
        self.norm_filter = OutlierFilter(cfg.outlier_factor, device)
        self.edges = torch.tensor(HIST_EDGES[1:-1], device=device)
        z = dict(device=device)
        self.t: dict[str, Tensor] = {
            "kept_tokens": torch.zeros(1, dtype=torch.int64, **z),
            "fire_count": torch.zeros(d_sae, dtype=torch.int64, **z),
            "act_sum": torch.zeros(d_sae, dtype=torch.float64, **z),
            "hist": torch.zeros(d_sae, len(HIST_EDGES) - 1, dtype=torch.int64, **z),
            "top_acts": torch.zeros(d_sae, cfg.top_n, **z),
            "top_tokens": torch.full((d_sae, cfg.top_n, cfg.window), -1, dtype=torch.int32, **z),
            "top_source": torch.full((d_sae, cfg.top_n), -1, dtype=torch.int64, **z),
        }
        if n_experts:
            self.t["expert_counts"] = torch.zeros(d_sae, n_experts, dtype=torch.int64, **z)
            self.t["expert_tokens"] = torch.zeros(n_experts, dtype=torch.int64, **z)

    def update(self, ids: Tensor, code: SparseCode, keep: Tensor, first_chunk: int, experts: Tensor | None = None) -> None:
        """ids (B, T); code over the B*T tokens; keep (B*T,) tokens that count; experts (B*T, k_e) routed experts."""
        B, T = ids.shape
        k, d, t, cfg = code.indices.shape[-1], self.d, self.t, self.cfg
        idx = code.indices.reshape(B, T, k)
        val = code.values.reshape(B, T, k).float()
        fired = (val > 0) & keep.reshape(B, T, 1)
        val = val * fired
        t["kept_tokens"] += keep.sum()
        f_idx, f_val = idx[fired], val[fired]
        t["fire_count"] += torch.bincount(f_idx, minlength=d)
        t["act_sum"].index_add_(0, f_idx, f_val.double())
        bins = torch.bucketize(f_val, self.edges, right=True)  # bin i holds [edge i, edge i+1)
        t["hist"] += torch.bincount(f_idx * t["hist"].shape[1] + bins, minlength=t["hist"].numel()).reshape(d, -1)
        if experts is not None and self.n_experts:
            token_of = torch.arange(B * T, device=ids.device).reshape(B, T, 1).expand(B, T, k)[fired]
            pairs = f_idx[:, None] * self.n_experts + experts[token_of]
            t["expert_counts"] += torch.bincount(pairs.flatten(), minlength=d * self.n_experts).reshape(d, -1)
            t["expert_tokens"] += torch.bincount(experts[keep].flatten(), minlength=self.n_experts)
        # Top contexts: the best token of each (sequence, feature), merged into the running top N per feature.
        flat_idx, flat_val = idx.reshape(B, T * k), val.reshape(B, T * k)
        seq_max = torch.zeros(B, d, device=ids.device).scatter_reduce_(1, flat_idx, flat_val, "amax")
        pos = torch.arange(T, device=ids.device).repeat_interleave(k).expand(B, -1)
        at_max = (flat_val == seq_max.gather(1, flat_idx)) & (flat_val > 0)
        seq_pos = torch.full((B, d), T, device=ids.device).scatter_reduce_(1, flat_idx, torch.where(at_max, pos, T), "amin")
        N = cfg.top_n
        new_acts, sel = torch.cat([t["top_acts"], seq_max.T], 1).topk(N, dim=1)
        from_batch = sel >= N
        b = (sel - N).clamp(min=0)
        p = seq_pos.T.gather(1, b).clamp(max=T - 1)
        padded = F.pad(ids, (cfg.left, cfg.right), value=-1)
        window = padded[b[..., None], p[..., None] + torch.arange(cfg.window, device=ids.device)].int()
        old = sel.clamp(max=N - 1)
        t["top_tokens"] = torch.where(from_batch[..., None], window,
                                      t["top_tokens"].gather(1, old[..., None].expand(-1, -1, cfg.window)))
        t["top_source"] = torch.where(from_batch, (first_chunk + b) * T + p, t["top_source"].gather(1, old))
        t["top_acts"] = new_acts

    def logit_lens(self, model, sae: SAE) -> None:
        names = ("logit_top_ids", "logit_top_vals", "logit_bottom_ids", "logit_bottom_vals")
        self.t.update(dict(zip(names, logit_lens(model, sae.W_dec, self.cfg.logit_k), strict=True)))

    def to_bytes(self) -> bytes:
        return save({name: v.detach().cpu().contiguous() for name, v in self.t.items()})

    def checkpoint_bytes(self) -> bytes:
        """The statistics and the outlier filter's running median, so that a resumed build filters as before."""
        f = self.norm_filter
        return save({**{name: v.detach().cpu().contiguous() for name, v in self.t.items()},
                     "outlier_medians": f.medians.cpu(), "outlier_count": torch.tensor(f.count)})

    def load(self, path: Path) -> None:
        """A checkpoint written by `checkpoint_bytes`."""
        try:
            got = load_file(path, device=str(self.t["fire_count"].device))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise SaescopeError(f"cannot read {path}: missing, corrupt or truncated checkpoint ({exc})") from exc
        expected = {*self.t, "outlier_medians", "outlier_count"}
        if set(got) != expected:
            raise SaescopeError(f"{path} holds {sorted(got)}, expected {sorted(expected)}")
        medians, count = got.pop("outlier_medians"), got.pop("outlier_count")
        if medians.shape != self.norm_filter.medians.shape or count.numel() != 1 or not 0 <= int(count):
            raise SaescopeError(f"{path}: the outlier filter's state is malformed")
        self.norm_filter.medians, self.norm_filter.count = medians.float(), int(count)
        for name, v in got.items():  # a checkpoint of other sizes would fail later, mid-batch, far from the cause
            if v.shape != self.t[name].shape or v.dtype != self.t[name].dtype:
                raise SaescopeError(f"{path}: {name} is {v.dtype} {list(v.shape)}, expected {self.t[name].dtype} "
                                    f"{list(self.t[name].shape)}")
        self.t = got


def _settings(cfg: StoreConfig, sae_spec: str, lm: LoadedModel, saes: dict[int, SAE]) -> dict:
    return {"format": FORMAT, "version": VERSION, "sae": sae_spec, "model": lm.name, "layers": sorted(saes),
            "fingerprints": {str(n): fingerprint(s) for n, s in saes.items()},
            "d_sae": {str(n): s.cfg.d_sae for n, s in saes.items()},
            "config": {f.name: getattr(cfg, f.name) for f in fields(StoreConfig)}, "hist_edges": HIST_EDGES}


@torch.no_grad()
def build_feature_store(lm: LoadedModel, saes: dict[int, SAE], out: str | Path, cfg: StoreConfig, *,
                        sae_spec: str, resume: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    """One pass over cfg.data (default: the embedded corpus) that writes the feature store of `saes` to OUT."""
    started = time.perf_counter()
    out = Path(out)
    partial = out / "partial"
    if (out / "store.json").exists() and not overwrite:
        raise ParamError(f"{escape(str(out))} already holds a feature store; give {{}} to rebuild it", "overwrite")
    settings = _settings(cfg, sae_spec, lm, saes)
    shape = moe_shape(lm.model)
    settings["moe"] = asdict(shape) if shape else None
    layers = sorted(saes)
    device = lm.device
    stats = {n: LayerStats(s.cfg.d_sae, cfg, device, shape.n_experts if shape else 0) for n, s in saes.items()}
    done = 0
    if resume and (partial / "progress.json").exists():
        try:
            prog = check_record(read_json(partial / "progress.json"), {"batches": Field(int, min=0, max=cfg.n_batches),
                                                                       "settings": Field(dict)}, str(partial / "progress.json"))
            if prog["settings"] != settings:
                diff = [k for k in settings if prog["settings"].get(k) != settings[k]]
                raise SaescopeError(f"{partial} was started with other settings ({', '.join(diff)})")
            done = prog["batches"]
            for n in layers:
                stats[n].load(partial / f"layer{n}-b{done}.safetensors")
        except SaescopeError as exc:
            raise ParamError(f"{escape(str(exc))}; start again without {{}}", "resume") from exc
    elif partial.exists():
        if not resume:
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    for sae in saes.values():
        sae.to(device)

    def checkpoint() -> None:
        for n in layers:
            atomic_write_bytes(partial / f"layer{n}-b{done}.safetensors", stats[n].checkpoint_bytes())
        atomic_write_json(partial / "progress.json", {"batches": done, "settings": settings})
        for old in partial.glob("layer*-b*.safetensors"):
            if not old.name.endswith(f"-b{done}.safetensors"):
                old.unlink()

    stream = batches(iter_texts(cfg.data, text_column=cfg.text_column, split=cfg.split), lm.tokenizer,
                     ctx_len=cfg.ctx_len, batch_size=cfg.batch_size, seed=cfg.seed, skip=done)
    bar = tqdm(total=cfg.n_batches * cfg.batch_size * cfg.ctx_len, initial=done * cfg.batch_size * cfg.ctx_len,
               desc="features", unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True)
    for ids in stream:
        if done >= cfg.n_batches:
            break
        ids = ids.to(device)
        if shape:
            with record_routing(lm.model, layers) as routes:
                acts = capture(lm.model, ids, layers)
        else:
            routes, acts = {}, capture(lm.model, ids, layers)
        for n in layers:
            x = acts[n].reshape(-1, acts[n].shape[-1]).float()
            keep = stats[n].norm_filter.keep(x)
            stats[n].update(ids, saes[n].encode(x), keep, done * cfg.batch_size, routes.get(n))
        done += 1
        bar.update(ids.numel())
        if done % 16 == 0:
            release_heap()
        if done % cfg.checkpoint_every == 0 and done < cfg.n_batches:
            checkpoint()
    bar.close()
    if done == 0:
        raise SaescopeError("no data: the corpus split is smaller than one batch")
    used: set[int] = set()
    for n in tqdm(layers, desc="logit lens", disable=not progress):
        stats[n].logit_lens(lm.model, saes[n])
        for name in ("top_tokens", "logit_top_ids", "logit_bottom_ids"):
            used.update(stats[n].t[name].unique().tolist())
        atomic_write_bytes(out / f"layer{n}.safetensors", stats[n].to_bytes())
    used.discard(-1)
    ids_sorted = sorted(used)
    atomic_write_json(out / "tokens.json", dict(zip(map(str, ids_sorted), token_strings(lm.tokenizer, ids_sorted))))
    settings.update(batches=done, tokens=done * cfg.batch_size * cfg.ctx_len,
                    counted_tokens={str(n): int(stats[n].t["kept_tokens"]) for n in layers},
                    build={"seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": round(peak_rss_mb()),
                           "device": str(device)})
    atomic_write_json(out / "store.json", settings)
    shutil.rmtree(partial, ignore_errors=True)
    return out


def _per_layer(layers: list[int], kind: type, low: int) -> Callable[[Any], str | None]:
    """A store.json field {layer: value} that must hold every layer."""
    def check(d: dict) -> str | None:
        bad = [n for n in layers if not (type(d.get(str(n))) is kind and d[str(n)] >= low)]
        return f"has no {'integer' if kind is int else kind.__name__} >= {low} for layer {bad[0]}" if bad else None
    return check


class FeatureStore:
    """Read side of a feature store: lazy, by layer and feature rows."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "store.json").is_file():
            raise SaescopeError(f"no feature store at {self.path} (build one with: saescope features build --sae SAES)")
        origin = str(self.path / "store.json")
        self.meta = read_json(self.path / "store.json")
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            raise SaescopeError(f"{origin} is not a saescope feature store")
        check_record(self.meta, {"version": Field(int), "layers": Field(list, check=lambda x: None if x and all(
            type(n) is int and n >= 0 for n in x) else "must list layer numbers")}, origin)
        if self.meta["version"] > VERSION:
            raise SaescopeError(f"{self.path} is feature store version {self.meta['version']}; this saescope reads up to {VERSION}")
        layers = self.meta["layers"]
        check_record(self.meta, {"sae": Field(str), "model": Field(str, nullable=True), "tokens": Field(int, min=0),
                                 "fingerprints": Field(dict), "d_sae": Field(dict, check=_per_layer(layers, int, 1)),
                                 "counted_tokens": Field(dict, check=_per_layer(layers, int, 0)), "config": Field(dict),
                                 "hist_edges": Field(list, check=lambda e: None if len(e) >= 2 and all(
                                     type(v) in (int, float) for v in e) else "must list 2 or more numbers"),
                                 "moe": Field(dict, nullable=True), "build": Field(dict), "batches": Field(int, min=1),
                                 "format": Field(str)}, origin)
        check_dataclass(StoreConfig, self.meta["config"], f"{origin}: config")
        if self.meta.get("moe"):
            check_record(self.meta["moe"], {"n_experts": Field(int, min=1)}, f"{origin}: moe")
        self._tokens: dict[str, str] | None = None

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    @property
    def left(self) -> int:
        return self.meta["config"]["left"]

    def d_sae(self, layer: int) -> int:
        return self.meta["d_sae"][str(self.check_layer(layer))]

    def check_layer(self, layer: int) -> int:
        if layer not in self.layers:
            raise SaescopeError(f"the feature store {self.path} has no layer {layer} (it has {', '.join(map(str, self.layers))})")
        return layer

    def check_matches(self, saes: dict[int, SAE], sae_spec: str) -> None:
        """Refuse to describe `saes` with statistics of other SAEs."""
        for n, sae in saes.items():
            if str(n) in self.meta["fingerprints"] and self.meta["fingerprints"][str(n)] != fingerprint(sae):
                raise SaescopeError(f"the feature store {self.path} was built from the SAEs {self.meta['sae']}, not from "
                                    f"{sae_spec} (layer {n} differs)")

    def _file(self, layer: int) -> Path:
        return self.path / f"layer{self.check_layer(layer)}.safetensors"

    @contextmanager
    def _open(self, layer: int):
        file = self._file(layer)
        try:
            with safe_open(file, "pt") as f:
                yield f
        except (SafetensorError, OSError, ValueError) as exc:
            raise SaescopeError(f"cannot read {file}: missing, corrupt or truncated ({exc})") from exc

    def _shape(self, layer: int, name: str) -> tuple | None:
        """The shape store.json implies for a tensor (None: not known)."""
        c, d = self.meta["config"], self.d_sae(layer)
        n, e = c["top_n"], (self.meta.get("moe") or {}).get("n_experts")
        return {"fire_count": (d,), "act_sum": (d,), "hist": (d, len(self.meta["hist_edges"]) - 1), "top_acts": (d, n),
                "top_tokens": (d, n, c["left"] + 1 + c["right"]), "top_source": (d, n), "logit_top_ids": (d, c["logit_k"]),
                "logit_top_vals": (d, c["logit_k"]), "logit_bottom_ids": (d, c["logit_k"]), "logit_bottom_vals": (d, c["logit_k"]),
                "expert_counts": (d, e) if e else None, "expert_tokens": (e,) if e else None}.get(name)

    def tensor(self, layer: int, name: str, rows: slice | int | None = None) -> Tensor:
        with self._open(layer) as f:
            if name not in f.keys():
                raise SaescopeError(f"{self._file(layer)} has no tensor {name}: the store is incomplete (rebuild it)")
            part = f.get_slice(name)
            shape, want = tuple(part.get_shape()), self._shape(layer, name)
            if want is not None and shape != want:  # rows of another SAE or settings: would index past the end or mislabel
                raise SaescopeError(f"{self._file(layer)}: {name} has shape {list(shape)}, store.json implies {list(want)}")
            t = f.get_tensor(name) if rows is None else part[rows]
        self._check_values(layer, name, t)
        return t

    def _check_values(self, layer: int, name: str, t: Tensor) -> None:
        """Values no build produces (negative or impossible counts, NaN sums, token ids the store does not know)
        are one line naming the file and tensor, not a figure printed as if it were measured."""
        bad = None
        if name in ("fire_count", "hist", "expert_counts", "expert_tokens"):
            if t.numel() and int(t.min()) < 0:
                bad = f"a negative count ({int(t.min())})"
            elif name == "fire_count" and t.numel() and int(t.max()) > self.n_tokens(layer):
                bad = f"a count of {int(t.max())} tokens, above the {self.n_tokens(layer)} tokens counted for layer {layer}"
        elif name in ("act_sum", "top_acts", "logit_top_vals", "logit_bottom_vals"):
            if not bool(torch.isfinite(t).all()):
                bad = "a value that is not a finite number"
            elif name in ("act_sum", "top_acts") and t.numel() and float(t.min()) < 0:
                bad = f"a negative activation ({float(t.min()):g})"
        elif name in ("top_tokens", "logit_top_ids", "logit_bottom_ids"):
            known = torch.tensor(sorted(int(k) for k in self._token_map()), dtype=torch.int64)
            ids = t.to(torch.int64).flatten()
            ids = ids[ids != -1] if name == "top_tokens" else ids
            unknown = ids[~torch.isin(ids, known)]
            if unknown.numel():
                bad = f"token id {int(unknown[0])}, which {self.path / 'tokens.json'} does not hold"
        if bad:
            raise SaescopeError(f"{self._file(layer)}: {name} holds {bad}; the store is damaged (rebuild it)")

    def _token_map(self) -> dict[str, str]:
        if self._tokens is None:
            tokens = read_json(self.path / "tokens.json")
            if not isinstance(tokens, dict) or not all(isinstance(v, str) for v in tokens.values()):
                raise SaescopeError(f"{self.path / 'tokens.json'}: expected an object {{token id: text}}")
            if not all(k.isdigit() for k in tokens):
                raise SaescopeError(f"{self.path / 'tokens.json'}: expected an object {{token id: text}} with integer ids")
            self._tokens = tokens
        return self._tokens

    def token(self, token_id: int) -> str:
        return self._token_map().get(str(token_id), f"<{token_id}>")

    def n_tokens(self, layer: int) -> int:
        """Tokens the layer's statistics count (the outlier filter leaves out attention-sink tokens)."""
        return int(self.meta["counted_tokens"][str(self.check_layer(layer))])

    def frequencies(self, layer: int) -> Tensor:
        return self.tensor(layer, "fire_count").double() / max(self.n_tokens(layer), 1)

    def top_activations(self, layer: int) -> Tensor:
        """Each feature's largest activation seen (0 for a feature never seen firing)."""
        return self.tensor(layer, "top_acts")[:, 0]

    def check_feature(self, layer: int, feature: int) -> None:
        d = self.d_sae(layer)
        if not 0 <= feature < d:
            raise SaescopeError(f"feature {feature} does not exist: layer {layer} has features 0..{d - 1}")

    def feature(self, layer: int, feature: int, *, contexts: int | None = None) -> dict:
        """Everything recorded about one feature, as plain Python values (JSON-ready)."""
        self.check_feature(layer, feature)
        row = slice(feature, feature + 1)
        get = lambda name: self.tensor(layer, name, row)[0]  # noqa: E731
        count = int(get("fire_count"))
        acts, windows = get("top_acts"), get("top_tokens")
        n = int((acts > 0).sum()) if contexts is None else min(int((acts > 0).sum()), contexts)
        out = {
            "layer": layer, "feature": feature, "fire_count": count,
            "frequency": count / max(self.n_tokens(layer), 1),
            "mean_activation": float(get("act_sum")) / count if count else 0.0,
            "max_activation": float(acts[0]),
            "hist": get("hist").tolist(), "hist_edges": self.meta["hist_edges"],
            "contexts": [{"activation": float(acts[i]), "mark": self.left,
                          "tokens": [self.token(int(t)) if t >= 0 else "" for t in windows[i]]} for i in range(n)],
            "promoted": [[self.token(int(i)), float(v)] for i, v in zip(get("logit_top_ids"), get("logit_top_vals"))],
            "suppressed": [[self.token(int(i)), float(v)] for i, v in zip(get("logit_bottom_ids"), get("logit_bottom_vals"))],
        }
        if self.meta.get("moe") and "expert_counts" in self._keys(layer):
            out["experts"] = expert_profile(get("expert_counts"), self.tensor(layer, "expert_tokens"))
        return out

    def _keys(self, layer: int) -> set[str]:
        with self._open(layer) as f:
            return set(f.keys())


def expert_profile(counts: Tensor, expert_tokens: Tensor) -> dict:
    """A feature's routing profile from its per-expert firing counts: the distribution over experts of the
    (token, expert) routings of its firing tokens, its entropy in bits (log2 E = uniform), and the lift of each
    expert (share among the feature's tokens / share among all tokens)."""
    counts = counts.double()
    total = counts.sum()
    share = counts / total if total > 0 else counts
    base = expert_tokens.double() / expert_tokens.sum().clamp(min=1)
    nz = share[share > 0]
    return {"distribution": share.tolist(), "entropy_bits": float(-(nz * nz.log2()).sum()),
            "max_entropy_bits": math.log2(len(counts)),
            "lift": torch.where(base > 0, share / base.clamp(min=1e-12), torch.zeros_like(share)).tolist()}


def expert_features(store: FeatureStore, layer: int, *, top: int = 10, min_count: int = 5) -> list[dict]:
    """Per expert, the features most associated with it: highest lift among features with >= min_count firings."""
    counts = store.tensor(layer, "expert_counts").double()
    base = store.tensor(layer, "expert_tokens").double()
    base = base / base.sum().clamp(min=1)
    totals = counts.sum(1, keepdim=True)
    lift = (counts / totals.clamp(min=1)) / base.clamp(min=1e-12)
    lift[totals[:, 0] < min_count] = 0
    out = []
    for e in range(counts.shape[1]):
        vals, idx = lift[:, e].topk(min(top, lift.shape[0]))
        out.append({"expert": e, "token_share": float(base[e]),
                    "features": [{"feature": int(i), "lift": float(v), "firings_routed_here": int(counts[i, e])}
                                 for v, i in zip(vals, idx) if v > 0]})
    return out
