"""Load SAEs of any origin behind one call, and write them in saescope, Qwen-Scope or SAELens format."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from saescope.core.errors import SaescopeError
from saescope.core.files import read_json
from saescope.core.hub import hub_reachable
from saescope.core.io.formats import (
    from_weights,
    load_gemma_scope,
    load_native,
    load_qwen_scope,
    load_saelens,
    load_sparsify,
    save_native,
    save_qwen_scope,
    save_saelens,
)
from saescope.core.io.lock import holding_lock
from saescope.core.io.run_dir import RunDir
from saescope.core.layers import LayersOption
from saescope.core.sae import SAE
from saescope.core.schema import REQUIRED, Field, check_record, config_field

__all__ = ["ExportConfig", "decoder_cos_to_init", "export_saes", "fingerprint", "from_weights", "load_saes",
           "refuse_overwrite", "resolve_run", "run_export", "save_native", "RunDir"]


def resolve_run(path: Path) -> Path:
    """A training run folder points at its latest complete checkpoint through the file `latest`."""
    return RunDir(path).latest() or path


SUMMARY_RECORD = {"steps": Field(int, min=0), "tokens": Field(int, min=0), "elapsed_s": Field(float, min=0),
                  "model_dtype": Field(str), "tokens_per_s": Field(float, min=0), "layers": Field(dict)}
SUMMARY_LAYER = {"dropped": Field(int, min=0), "seen": Field(int, min=0), "nonfinite_batches": Field(int, min=0),
                 "decoder_cos_to_init": Field(float, min=-1, max=1)}


def read_summary(run: Path) -> dict | None:
    """A saescope run's train_summary.json, strictly (every field with its type), or None for a folder that has none
    (other formats, a run still training)."""
    path = RunDir(run).train_summary
    if not path.is_file():
        return None
    summary = read_json(path, SUMMARY_RECORD)
    for n, layer in summary["layers"].items():
        check_record(layer, SUMMARY_LAYER, f"{path}: layers.{n}")
    return summary


def decoder_cos_to_init(run: Path) -> dict[str, float]:
    """Per layer, the median cosine of a saescope run's decoder rows to their initialisation (train_summary.json); empty
    for other formats. Near 1, the SAE is still mostly its random start."""
    summary = read_summary(run)
    return {str(n): float(v["decoder_cos_to_init"]) for n, v in summary["layers"].items()} if summary else {}


def fingerprint(sae: SAE) -> str:
    """A short hash of an SAE's decoder, k and (beside top-k) its kind and own tensors: files derived from an SAE (feature
    stores) record it, so that they are never read against another SAE."""
    kind = "" if sae.cfg.kind == "topk" else sae.cfg.kind  # top-k hashes as it did before kinds existed
    h = hashlib.sha1(f"{sae.cfg.d_model}x{sae.cfg.d_sae}k{sae.cfg.k}{kind}".encode())
    tensors = [sae.W_dec, sae.b_dec, *(v for _, v in sorted(sae.extra_tensors().items()))]
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


K_HELP = ("k, for Qwen-Scope folders whose name does not give it; for JumpReLU, ReLU and gated SAEs (SAELens, Gemma "
          "Scope) the L0 their controls keep (default: the average_l0_N of the path, else d_sae)")
_NATIVE = re.compile(r"layer(\d+)\.safetensors")
_QWEN_SCOPE = re.compile(r"layer(\d+)\.sae\.pt")


def _layers_in(path: Path, pattern: re.Pattern) -> dict[int, Path]:
    """Files named exactly as a format names its layers; strays such as layer_backup.safetensors are not SAEs."""
    return {int(m.group(1)): p for p in path.iterdir() if (m := pattern.fullmatch(p.name))}


def load_saes(spec: str | Path, *, layers: list[int] | None = None, k: int | None = None) -> dict[int, SAE]:
    """All SAEs at SPEC, keyed by layer: a saescope run or checkpoint, a Qwen-Scope folder or hub repo, a SAELens
    folder (or a folder of them), a Gemma Scope params.npz (or a folder of layer_{n}/.../params.npz), or a sparsify
    folder. `layers` restricts what is read."""
    path = Path(spec).expanduser()
    if not path.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(spec)) and not path.parent.is_dir():  # a hub id, not a local path
            path = _hub_snapshot(str(spec))
        else:
            raise SaescopeError(f"SAE path not found: {spec}")
    if path.is_file():
        if path.name.endswith(".sae.pt"):
            sae = load_qwen_scope(path, k)
            return {sae.meta["layer"]: sae}
        if path.suffix == ".npz":
            sae = load_gemma_scope(path, k)
            sae.meta.setdefault("layer", 0)
            return {sae.meta["layer"]: sae} if layers is None or sae.meta["layer"] in layers else _none_of(layers, path)
        raise SaescopeError(f"{path}: not an SAE file (give a Qwen-Scope .sae.pt, a Gemma Scope params.npz, or the folder "
                            "of a saescope, SAELens or sparsify SAE)")
    path = resolve_run(path)
    want = (lambda n: layers is None or n in layers)
    found: dict[int, SAE] = {}
    native, qs = _layers_in(path, _NATIVE), _layers_in(path, _QWEN_SCOPE)
    if native:
        found = {n: load_native(path, n) for n in sorted(native) if want(n)}
    elif qs:
        found = {n: load_qwen_scope(p, k) for n, p in sorted(qs.items()) if want(n)}
    elif (path / "sae_weights.safetensors").exists():
        sae = load_saelens(path, k)
        found = {sae.meta.get("layer", 0): sae}
    elif (path / "params.npz").exists():
        sae = load_gemma_scope(path / "params.npz", k)
        found = {sae.meta.get("layer", 0): sae}
    elif npz := sorted(path.glob("layer_*/**/params.npz")):
        for f in npz:
            m = re.fullmatch(r"layer_(\d+)", f.relative_to(path).parts[0])
            n = int(m.group(1)) if m else None
            if n is None or not want(n):
                continue
            if n in found:
                raise SaescopeError(f"{path}: two Gemma Scope SAEs for layer {n} ({found[n].meta['path']} and "
                                    f"{f.parent.relative_to(path)}); give the folder of the one to read")
            found[n] = load_gemma_scope(f, k)
            found[n].meta["path"] = str(f.parent.relative_to(path))
    elif (path / "sae.safetensors").exists():
        sae = load_sparsify(path)
        found = {sae.meta.get("layer", 0): sae}
    else:
        subs = sorted(p for p in path.iterdir() if p.is_dir() and re.search(r"\d+$", p.name))
        for sub in subs:
            if (sub / "sae_weights.safetensors").exists():
                sae = load_saelens(sub, k)
            elif (sub / "sae.safetensors").exists():
                sae = load_sparsify(sub)
            elif (sub / "cfg.json").exists():  # an SAE folder whose weights are gone: not silently one layer fewer
                raise SaescopeError(f"{sub} holds cfg.json but no weights (sae_weights.safetensors or sae.safetensors)")
            else:
                continue
            n = sae.meta.get("layer", int(re.search(r"(\d+)$", sub.name).group(1)))
            if n in found:
                raise SaescopeError(f"{path}: two SAEs for layer {n} ({found[n].meta.get('hook_name') or '?'} and {sub.name})")
            if want(n):
                found[n] = sae
    missing = sorted(set(layers or []) - set(found))
    if missing or not found:
        on_disk = sorted({*native, *qs})
        have = f" (it has layers {', '.join(map(str, on_disk))})" if on_disk else ""
        raise SaescopeError(f"no SAE for layer {missing[0]} in {path}{have}" if missing else f"{path}: no SAEs found")
    for n, sae in found.items():
        if k is not None and sae.meta.get("origin") != "qwen-scope" and sae.cfg.k != k:
            raise SaescopeError(f"--k {k}: the SAE of layer {n} in {path} records k {sae.cfg.k} (--k is for Qwen-Scope files "
                                "whose name does not give it, and for the L0 of threshold SAEs that record none)")
        sae.meta["layer"] = n
    return dict(sorted(found.items()))


def _none_of(layers: list[int], path: Path) -> dict[int, SAE]:
    raise SaescopeError(f"no SAE for layer {layers[0]} in {path}")


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.sae.pt", "*.json", "*.safetensors"],
                                      local_files_only=not hub_reachable()))
    except Exception as exc:  # offline, missing repo, auth: all one message to the user
        raise SaescopeError(f"cannot fetch SAEs from hub repo {repo_id!r} (is the hub reachable?): {type(exc).__name__}") from exc


_EXPORT_TARGETS = {"saelens": ("layer{n}/sae_weights.safetensors", "layer{n}/cfg.json"), "qwen-scope": ("layer{n}.sae.pt",),
                   "saescope": ("layer{n}.safetensors", "layer{n}.json")}


def refuse_overwrite(out: Path, targets: list[Path]) -> None:
    """SAE files are never silently replaced: writing where SAEs of the same layers already are is refused up front."""
    if existing := [p for p in targets if p.exists()]:
        raise SaescopeError(f"{out} already holds {existing[0].relative_to(out)}"
                            f"{f' and {len(existing) - 1} more' if len(existing) > 1 else ''}: choose another --out or remove them first")


def export_saes(saes: dict[int, SAE], out: Path, fmt: str, *, model_name: str = "") -> list[Path]:
    """Write SAEs in another format: 'saelens' (one folder per layer), 'qwen-scope' or 'saescope'."""
    if fmt not in _EXPORT_TARGETS:
        raise SaescopeError(f"unknown format {fmt!r}; use saelens, qwen-scope or saescope")
    for n, sae in saes.items():  # before anything is written: an export is whole or not at all
        if fmt == "qwen-scope" and sae.cfg.kind != "topk":
            raise SaescopeError(f"layer {n} is a {sae.cfg.kind} SAE; the Qwen-Scope format holds top-k SAEs only (export to "
                                "saelens or saescope)")
        if fmt == "saelens" and sae.cfg.kind == "gated":
            raise SaescopeError(f"layer {n} is a gated SAE; saescope does not write gated SAELens folders (export to saescope)")
    refuse_overwrite(out, [out / t.format(n=n) for n in saes for t in _EXPORT_TARGETS[fmt]])
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for n, sae in saes.items():
        if fmt == "saelens":
            save_saelens(sae, out / f"layer{n}", hook_name=f"model.layers.{n}", model_name=model_name)
            written.append(out / f"layer{n}")
        elif fmt == "qwen-scope":
            save_qwen_scope(sae, out, n)
            written.append(out / f"layer{n}.sae.pt")
        else:
            save_native(sae, out, n)
            written.append(out / f"layer{n}.safetensors")
    return written


@dataclass(kw_only=True)
class ExportConfig(LayersOption):
    """`saescope export`: SAEs of any format load_saes reads, written in SAELens, Qwen-Scope or saescope format."""

    sae: str = config_field(REQUIRED, "SAE folder (saescope run or checkpoint, Qwen-Scope, SAELens, Gemma Scope or sparsify) "
                            "or a Gemma Scope params.npz")
    to: str = config_field(REQUIRED, "the format to write", choices=tuple(_EXPORT_TARGETS))
    out: str = config_field(REQUIRED, "the folder to write into (SAE files there are never replaced)", output="folder")
    k: int | None = config_field(None, K_HELP, min=1)

    def writes_into(self) -> Path:
        return Path(self.out)


@dataclass
class ExportResult:
    written: list[Path]

    def text(self) -> str:
        return "\n".join(map(str, self.written))


@holding_lock
def run_export(cfg: ExportConfig) -> ExportResult:
    saes = load_saes(cfg.sae, layers=cfg.layer_list(), k=cfg.k)
    model = next(iter(saes.values())).meta.get("model", "")
    return ExportResult(export_saes(saes, Path(cfg.out), cfg.to, model_name=model))
