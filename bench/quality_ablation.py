"""Quality per CPU-minute: train one SAE per variant on the same layers and token budget, then measure each beside
its own random control (sparse probing on real labelled text, FVU by domain, decoder movement) and print one table.

    python bench/quality_ablation.py --layers 15 --max-tokens 131072 --preset 8x-k32 \\
        --variant base: --variant small-steps:batch_size=2 --variant lr3x:lr=0.0012

A variant is NAME:FIELD=VALUE,... over TrainConfig's fields (empty: the defaults). Wall time per variant is
printed beside its figures, so that variants are compared at equal time, not only equal tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path

from saescope.api.controls import make_controls
from saescope.api.evaluate import evaluate_sets
from saescope.api.probing import probe_sets, sparse_probing
from saescope.api.quality import quality_report
from saescope.api.scope import Scope
from saescope.core.files import atomic_write_json
from saescope.core.io import decoder_cos_to_init, load_saes
from saescope.core.models import load_model
from saescope.core.train import TrainConfig, Trainer


def _variant(spec: str) -> tuple[str, dict]:
    name, _, body = spec.partition(":")
    types = {f.name: f.type for f in fields(TrainConfig)}
    values = {}
    for item in filter(None, body.split(",")):
        key, _, raw = item.partition("=")
        kind = str(types[key])
        values[key] = int(raw) if "int" in kind else float(raw) if "float" in kind else raw
    return name, values


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="15")
    p.add_argument("--max-tokens", type=int, default=131072)
    p.add_argument("--preset", default="8x-k32")
    p.add_argument("--variant", action="append", default=[], help="NAME:FIELD=VALUE,...")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for CE recovered and KL")
    p.add_argument("--pca-control", action="store_true",
                   help="also probe a control whose directions lie in the data's principal subspace (90%% variance)")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--json", default=None, help="results file (default: OUT/ablation.json)")
    a = p.parse_args()
    probes = probe_sets(per_class=a.per_class)
    results, lm, train_lm = {}, None, None
    for spec in a.variant or ["base:"]:
        name, values = _variant(spec)
        out = Path(a.out) / name
        cfg = TrainConfig(layers=a.layers, max_tokens=a.max_tokens, preset=a.preset, out=str(out), **values)
        start = time.perf_counter()
        trainer = Trainer(cfg, lm=train_lm)
        summary = trainer.fit()
        train_lm = trainer.lm  # in bf16 on a CPU with native bf16 (the trainer's auto); measured in fp32 below
        lm = lm or load_model(cfg.model, dtype="fp32")
        seconds = time.perf_counter() - start
        saes = load_saes(out)
        control = make_controls(saes, seed=1)
        report = quality_report(Scope(lm, saes), probes, control=control, run=out, fvu_tokens=4096)
        # The LM loss with the SAE spliced in (CE recovered against zero and mean ablation, KL), on held-out corpus.
        evals = evaluate_sets(lm, {"sae": saes, "control": control}, n_tokens=a.eval_tokens)
        for which, rows in evals.items():
            for r in rows:
                row = report["layers"][str(r.layer)]
                for key in ("ce_recovered", "ce_recovered_mean", "kl", "dead_frac", "dense_frac"):
                    row[f"{which}_{key}"] = getattr(r, key)
        if a.pca_control:  # directions drawn where the data lives: what being in the subspace alone gives
            pca = make_controls(saes, seed=1, subspace="pca", lm=lm, data=None, n_tokens=8192)
            got = sparse_probing(Scope(lm, saes), probes, control=pca)["mean_over_tasks"]
            for n, row in got.items():
                report["layers"][n]["pca_control_top1"] = row["control_top1"]
                report["layers"][n]["pca_control_top5"] = row["control_top5"]
        results[name] = {"config": values, "train_seconds": seconds, "tokens": summary["tokens"],
                         "cos_to_init": decoder_cos_to_init(out), "layers": report["layers"],
                         "tasks": {t: {n: {"sae": v["sae"]["top1"], "control": v["control"]["top1"], "dense": v["dense"],
                                           "sae_top5": v["sae"]["top5"], "control_top5": v["control"]["top5"]}
                                       for n, v in r["layers"].items()} for t, r in report["probing"]["tasks"].items()}}
        del trainer
        print(f"{name}: {seconds:.0f}s", json.dumps({n: {k: round(v, 3) for k, v in r.items() if isinstance(v, float)}
                                                     for n, r in report["layers"].items()}), flush=True)
    print(f"\n{'variant':<16} {'layer':>5} {'train s':>7} {'top1':>6} {'ctl':>6} {'top5':>6} {'ctl':>6} {'FVU':>6} {'FVU ctl':>7} "
          f"{'math':>6} {'code':>6} {'multi':>6} {'cos0':>5} {'CEr0':>6} {'CErM':>6} {'KL':>6} {'dense':>6} {'pca ctl':>7}")
    for name, r in results.items():
        for n, row in r["layers"].items():
            cos = row.get("decoder_cos_to_init")
            print(f"{name:<16} {n:>5} {r['train_seconds']:7.0f} {row['sae_top1']:6.3f} {row['control_top1']:6.3f} "
                  f"{row['sae_top5']:6.3f} {row['control_top5']:6.3f} {row['sae_fvu_in_domain']:6.3f} "
                  f"{row['control_fvu_in_domain']:7.3f} {row['sae_fvu_math']:6.3f} {row['sae_fvu_code']:6.3f} "
                  f"{row['sae_fvu_multilingual']:6.3f} {cos if cos is None else round(cos, 3)!s:>5} "
                  f"{row['sae_ce_recovered']:6.3f} {row['sae_ce_recovered_mean']:6.3f} {row['sae_kl']:6.3f} "
                  f"{row['sae_dense_frac']:6.3f} "
                  f"{row.get('pca_control_top1', float('nan')):7.3f}")
    atomic_write_json(Path(a.json) if a.json else Path(a.out) / "ablation.json", results)


if __name__ == "__main__":
    main()
