"""`saescope groundtruth make | score`.

    saescope groundtruth make --out gt/                 gt/activations.npy (training samples), gt/synthetic.json
    saescope train --activations gt/activations.npy --arch batchtopk --expansion 8 --k 6 --out gt/batchtopk
    saescope control frozen-decoder --like gt/batchtopk --out gt/batchtopk-frozen
    saescope groundtruth score --synthetic gt/ --sae gt/batchtopk --sae gt/batchtopk-frozen

The held-out samples are drawn again from the config's seed (never the training samples); `score` adds a random
control of the first SAE, made in memory, to every table.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from saescope.api.ground_truth import ground_truth_scores
from saescope.core.data.synthetic import SyntheticConfig, SyntheticFeatures
from saescope.core.errors import ParamError, SaescopeError
from saescope.core.files import atomic_write_json, read_json, temporary
from saescope.core.io import load_saes, read_summary
from saescope.core.io.lock import holding_lock
from saescope.core.sae import random_like
from saescope.core.schema import REQUIRED, Config, Field, config_field, escape

SYNTHETIC_FORMAT = "saescope-synthetic"
TRAIN_STREAM, EVAL_STREAM = 1, 1_000_003  # offsets of the training and held-out samples' seeds from the config's


@dataclass(kw_only=True)
class MakeConfig(SyntheticConfig):
    """`saescope groundtruth make`: training samples of a ground-truth activation distribution, for train --activations."""

    out: str = config_field(REQUIRED, "the folder: activations.npy and synthetic.json", output="folder")
    samples: int = config_field(1_000_000, "training samples written", min=1)
    eval_samples: int = config_field(16_384, "held-out samples score draws (from the seed; never written)", min=1)

    def writes_into(self) -> Path:
        return Path(self.out)

    def synthetic(self) -> SyntheticConfig:
        return SyntheticConfig(**{f.name: getattr(self, f.name) for f in fields(SyntheticConfig)})


@dataclass
class MakeResult:
    out: Path
    samples: int
    seconds: float
    mean_active: float

    def text(self) -> str:
        return (f"{self.samples} samples ({self.mean_active:.2f} true features firing on average) in "
                f"{self.out / 'activations.npy'} ({self.seconds:.0f}s); train on them with saescope train --activations "
                f"{self.out / 'activations.npy'}")


@holding_lock
def run_make(cfg: MakeConfig) -> MakeResult:
    out = Path(cfg.out)
    target = out / "activations.npy"
    if target.exists() or (out / "synthetic.json").exists():
        raise ParamError(f"{escape(str(out))} already holds a synthetic set; choose another {{}}", "out")
    out.mkdir(parents=True, exist_ok=True)
    features = SyntheticFeatures(cfg.synthetic())
    started = time.perf_counter()
    tmp = temporary(target)
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(cfg.samples, cfg.d))
    gen = torch.Generator().manual_seed(cfg.seed + TRAIN_STREAM)
    done, active = 0, 0.0
    with tqdm(total=cfg.samples, desc="synthetic activations", unit="sample", unit_scale=True, dynamic_ncols=True) as bar:
        for x, truth in features.batches(cfg.samples, gen):
            array[done:done + len(x)] = x.numpy()
            active += float((truth > 0).sum())
            done += len(x)
            bar.update(len(x))
    array.flush()
    del array
    tmp.replace(target)
    atomic_write_json(out / "synthetic.json", {"format": SYNTHETIC_FORMAT, "config": asdict(cfg.synthetic()),
                                               "samples": cfg.samples, "eval_samples": cfg.eval_samples,
                                               "mean_active_measured": active / cfg.samples})
    return MakeResult(out, cfg.samples, time.perf_counter() - started, active / cfg.samples)


SYNTHETIC_RECORD = {"format": Field(str), "config": Field(dict), "samples": Field(int, min=1), "eval_samples": Field(int, min=1)}


def read_synthetic(folder: Path) -> tuple[SyntheticFeatures, int]:
    info = read_json(folder / "synthetic.json", SYNTHETIC_RECORD)
    if info["format"] != SYNTHETIC_FORMAT:
        raise SaescopeError(f"{folder}/synthetic.json: format {info['format']!r} is not {SYNTHETIC_FORMAT!r}")
    try:
        cfg = SyntheticConfig(**info["config"])
    except TypeError as exc:
        raise SaescopeError(f"{folder}/synthetic.json: config does not describe a synthetic set ({exc})") from None
    return SyntheticFeatures(cfg), info["eval_samples"]


@dataclass(kw_only=True)
class ScoreConfig(Config):
    """`saescope groundtruth score`: how many true features each SAE recovers, beside a random control."""

    synthetic: str = config_field(REQUIRED, "the folder groundtruth make wrote")
    sae: list[str] = config_field(REQUIRED, "an SAE run trained on its activations (any kind; a control too); repeat it",
                                  repeat=True)
    out: str | None = config_field(None, "JSON results (default: SYNTHETIC/scores.json)", output="file")

    def output(self) -> Path:
        return Path(self.out) if self.out else Path(self.synthetic) / "scores.json"

    def writes_into(self) -> Path:
        return self.output().parent


@dataclass
class ScoreResult:
    path: Path
    rows: list[dict] = field(default_factory=list)

    def text(self) -> str:
        head = (f"{'SAE':>28} {'kind':>10} {'k':>4} {'recovered':>9} {'best cos':>8} {'MCC':>6} {'absorb':>6} {'EV':>6} "
                f"{'L0':>6} {'tok/s':>7} {'unpaired':>8} {'parents':>7} {'children':>8}")
        lines = ["ground truth: true features recovered (a decoder row at cosine > 0.9), mean best cosine, MCC (one-to-one",
                 "matched activations), absorption on parent/child pairs, explained variance, L0; on held-out samples;",
                 "recovered among the features in no pair, the parents and the children (a child fires only with its parent)",
                 head]
        for r in self.rows:
            tok = f"{r['train_tok_s']:7.0f}" if r.get("train_tok_s") else f"{'-':>7}"
            absorb = f"{r['absorption']:6.3f}" if not math.isnan(r["absorption"]) else f"{'-':>6}"
            lines.append(f"{r['name'][-28:]:>28} {r['kind']:>10} {r['k']:>4} {r['recovered']:9.3f} {r['mean_best_cos']:8.3f} "
                         f"{r['mcc']:6.3f} {absorb} {r['explained_variance']:6.3f} {r['l0']:6.1f} {tok} "
                         + " ".join(f"{r['recovered_by_structure'][g]['recovered']:{w}.3f}"
                                    for g, w in (("unpaired", 8), ("parents", 7), ("children", 8))))
        return "\n".join([*lines, f"results: {self.path}"])


def _one_sae(path: str):
    saes = load_saes(path)
    if len(saes) != 1:
        raise SaescopeError(f"{path} holds {len(saes)} layers' SAEs; a synthetic set has one")
    return next(iter(saes.values()))


@holding_lock
def run_score(cfg: ScoreConfig) -> ScoreResult:
    features, n_eval = read_synthetic(Path(cfg.synthetic))
    saes = {path: _one_sae(path) for path in cfg.sae}  # every SAE read before the work
    for path, sae in saes.items():
        if sae.cfg.d_model != features.cfg.d:
            raise SaescopeError(f"{path}: d_model {sae.cfg.d_model}, but the synthetic set has d {features.cfg.d}")
    x, truth = features.sample(n_eval, torch.Generator().manual_seed(features.cfg.seed + EVAL_STREAM))
    first_path, first = next(iter(saes.items()))
    rows = []
    for name, sae in [*saes.items(), (f"random control of {Path(first_path).name}", random_like(first, seed=0))]:
        scores = ground_truth_scores(sae, features, x, truth)
        summary = read_summary(Path(name)) if Path(name).is_dir() else None
        control = sae.meta.get("control", {}).get("kind") if isinstance(sae.meta.get("control"), dict) else None
        rows.append({"name": name, "kind": sae.cfg.kind, "k": sae.cfg.k, "d_sae": sae.cfg.d_sae, "control": control,
                     "train_tok_s": summary["tokens_per_s"] if summary else None,
                     "train_tokens": summary["tokens"] if summary else None, **scores})
    out = cfg.output()
    atomic_write_json(out, {"synthetic": cfg.synthetic, "config": asdict(features.cfg), "eval_samples": n_eval, "rows": rows})
    return ScoreResult(out, rows)

