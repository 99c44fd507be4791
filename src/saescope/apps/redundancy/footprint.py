"""Benchmark footprints: the set of SAE features each prompt turns on, per layer, stored compactly.

On disk (a folder, written one benchmark at a time, so an interrupted run resumes where it stopped):

    footprints.json          settings (SAE, model, pool, layers, d_sae, k) and per benchmark: prompts, source, hash
    sae/{bench}.safetensors  per layer n: "layer{n}.indptr" (int64, prompts + 1), "layer{n}.indices" (int32):
                             prompt i's active features are indices[indptr[i]:indptr[i+1]] (CSR rows)
    control/{bench}.safetensors   the same for the random control SAEs, when footprinted with one

Pooling: "last" = features active at the last token (as the report); "max" = the k features with the largest
max-over-tokens activation; "all" = every feature active at any token. Position 0 is left out of max/all
(the attention sink on models without BOS).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from saescope.api.scope import Scope
from saescope.apps.redundancy.metrics import FeatureSets
from saescope.core.data.benchmarks import Benchmark
from saescope.core.errors import ParamError, SaescopeError
from saescope.core.files import atomic_write_bytes, atomic_write_json, read_json
from saescope.core.sae import SAE
from saescope.core.schema import Field, check_record, escape
from saescope.core.system import release_heap

POOLS = ("last", "max", "all")
FORMAT = "saescope-footprints"
# Settings that must agree for a resumed or extended footprint folder to stay one comparable set.
_SETTINGS = ("sae", "model", "pool", "layers", "d_sae", "k", "max_length", "control")


def prompts_hash(prompts: list[str]) -> str:
    h = hashlib.sha1()
    for p in prompts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _to_sets(pooled: torch.Tensor, pool: str, k: int) -> list[np.ndarray]:
    if pool == "max":
        values, idx = pooled.topk(min(k, pooled.shape[1]), dim=1)
        return [i[v > 0].cpu().numpy() for i, v in zip(idx, values)]
    return [row.nonzero().flatten().cpu().numpy() for row in pooled]


def compute_footprints(scope: Scope, benchmarks: list[Benchmark], out: str | Path, *, sae_name: str,
                       layers: list[int] | None = None, pool: str = "last", control: dict[int, SAE] | None = None,
                       control_name: str | None = None, batch_size: int = 16, max_length: int = 512,
                       progress: bool = True) -> list[str]:
    """Footprint every benchmark on every layer (and with the control SAEs in the same LM pass) into `out`. Returns the
    benchmarks `out` already held with the same prompts, which are kept as they are."""
    if pool not in POOLS:
        raise SaescopeError(f"unknown pooling {pool!r}; use one of {', '.join(POOLS)}")
    out = Path(out)
    layers = sorted(layers or scope.layers)
    first = scope.saes[layers[0]]
    settings = {"sae": sae_name, "model": scope.lm.name, "pool": pool, "layers": layers, "d_sae": first.cfg.d_sae,
                "k": first.cfg.k, "max_length": max_length, "control": control_name}
    meta_path = out / "footprints.json"
    meta = {"format": FORMAT, "version": 1, **settings, "benchmarks": {}}
    if meta_path.exists():
        old = _read_meta(meta_path)
        diff = [f"{s}: {old.get(s)!r} there, {settings[s]!r} now" for s in _SETTINGS if old.get(s) != settings[s]]
        if diff:
            raise ParamError(f"{escape(str(out))} holds footprints made with other settings ({escape('; '.join(diff))}): use "
                             "another {}", "out")
        meta["benchmarks"] = old["benchmarks"]
    sets = {"sae": scope.saes, **({"control": control} if control else {})}
    kept = []
    for i, bench in enumerate(benchmarks, start=1):
        digest = prompts_hash(bench.prompts)
        done = meta["benchmarks"].get(bench.name)
        if done and done["hash"] != digest:
            raise ParamError(escape(f"{out} already holds a footprint of {bench.name} made from other prompts "
                                    f"({done.get('source')}, {done.get('n')} prompts)")
                             + f": use another {{}}, or remove {escape(bench.name)} from it first", "out")
        if done and done["hash"] == digest and all((out / s / f"{bench.name}.safetensors").exists() for s in sets):
            kept.append(bench.name)
            continue
        rows: dict[str, dict[int, list[np.ndarray]]] = {s: {n: [None] * len(bench.prompts) for n in layers} for s in sets}
        for batch, (idx, pooled) in enumerate(scope.iter_pooled(bench.prompts, layers=layers, pool="last" if pool == "last" else "max",
                                             batch_size=batch_size, max_length=max_length, skip_first_token=True,
                                             progress=progress, sae_sets=sets, desc=f"{bench.name} ({i}/{len(benchmarks)})")):
            if batch % 16 == 15:
                release_heap()
            for s, per_layer in pooled.items():
                for n, dense in per_layer.items():
                    for j, feats in zip(idx, _to_sets(dense, pool, sets[s][n].cfg.k)):
                        rows[s][n][j] = feats
        for s in sets:
            write_sets(out / s / f"{bench.name}.safetensors",
                       {n: FeatureSets.from_lists(rows[s][n], sets[s][n].cfg.d_sae) for n in layers})
        meta["benchmarks"][bench.name] = {"n": len(bench.prompts), "source": bench.source, "hash": digest}
        atomic_write_json(meta_path, meta)
    return kept


def write_sets(path: Path, per_layer: dict[int, FeatureSets]) -> None:
    tensors = {}
    for n, fs in per_layer.items():
        tensors[f"layer{n}.indptr"] = torch.from_numpy(fs.indptr)
        tensors[f"layer{n}.indices"] = torch.from_numpy(fs.indices)
    atomic_write_bytes(path, save(tensors))


def _ints(x: list) -> str | None:
    return None if x and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in x) else "must list layer numbers"


def _bench_entries(b: dict) -> str | None:
    for name, e in b.items():
        if not (isinstance(e, dict) and isinstance(e.get("n"), int) and not isinstance(e["n"], bool) and e["n"] >= 1
                and isinstance(e.get("hash"), str)):
            return f"entry {name!r} must be an object with a prompt count 'n' >= 1 and a 'hash'"
    return None


_META = {"format": Field(str), "sae": Field(str), "model": Field(str, nullable=True), "layers": Field(list, check=_ints),
         "pool": Field(str, check=lambda p: None if p in POOLS else f"must be one of {', '.join(POOLS)}"),
         "d_sae": Field(int, min=1), "k": Field(int, min=1), "max_length": Field(int, min=1),
         "control": Field(str, nullable=True), "benchmarks": Field(dict, check=_bench_entries), "version": Field(int, min=1)}


def _read_meta(path: Path) -> dict:
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SaescopeError(f"{path} is not a saescope footprint file")
    return check_record(meta, _META, str(path))


@dataclass
class Footprints:
    """A footprint folder, read lazily: one benchmark's layer at a time."""

    path: Path
    meta: dict

    @classmethod
    def load(cls, path: str | Path) -> Footprints:
        path = Path(path)
        if not (path / "footprints.json").is_file():
            raise SaescopeError(f"no footprints in {path} (run saescope redundancy footprint first)")
        return cls(path, _read_meta(path / "footprints.json"))

    @property
    def benchmarks(self) -> list[str]:
        return list(self.meta["benchmarks"])

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    @property
    def has_control(self) -> bool:
        return bool(self.meta.get("control"))

    def sets(self, bench: str, layer: int, which: str = "sae") -> FeatureSets:
        if bench not in self.meta["benchmarks"]:
            raise SaescopeError(f"benchmark {bench!r} is not in {self.path} (have {', '.join(self.benchmarks)})")
        if layer not in self.meta["layers"]:
            raise SaescopeError(f"layer {layer} is not in {self.path} (have {self.meta['layers']})")
        file = self.path / which / f"{bench}.safetensors"
        if not file.is_file():
            raise SaescopeError(f"missing {file}: the footprint folder is incomplete")
        try:
            with safe_open(file, "numpy") as f:
                names = [f"layer{layer}.indptr", f"layer{layer}.indices"]
                if lost := [n for n in names if n not in f.keys()]:
                    raise SaescopeError(f"{file} has no tensor {lost[0]}: the footprint folder is incomplete")
                indptr, indices = (f.get_tensor(n) for n in names)
        except (SafetensorError, OSError, ValueError) as exc:
            raise SaescopeError(f"cannot read {file}: corrupt or truncated safetensors file ({exc})") from exc
        # CSR rows that do not fit the recorded prompt count and d_sae would index out of range or count wrongly
        n, d = self.meta["benchmarks"][bench]["n"], self.meta["d_sae"]
        if not (indptr.shape == (n + 1,) and indices.ndim == 1 and indptr.dtype.kind == "i" and indices.dtype.kind == "i"):
            raise SaescopeError(f"{file}: layer{layer}.indptr/indices have shapes {indptr.shape}/{indices.shape} and types "
                                f"{indptr.dtype}/{indices.dtype}; expected integer CSR rows for {n} prompts")
        if indptr[0] != 0 or indptr[-1] != len(indices) or (np.diff(indptr) < 0).any():
            raise SaescopeError(f"{file}: layer{layer}.indptr is not a valid row index for {len(indices)} features")
        if len(indices) and not 0 <= indices.min() <= indices.max() < d:
            raise SaescopeError(f"{file}: layer{layer}.indices holds features outside 0..{d - 1} (d_sae in footprints.json)")
        return FeatureSets(indptr, indices, d)
