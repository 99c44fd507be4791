"""Which statistic a weighted toxicity rule should read, chosen on the mining texts alone: the max activation of each
feature over a text's tokens (what `toxicity mine` writes), its mean over the tokens, or both; candidates ranked by
the firing delta (as `mine`) or by the standardised difference of means; 256 or 1,024 of them; K = 5, 10, 20. Each
variant is mined by the product's own L1 path (saescope.api.rules.sparse_logistic) on the SAE and on its random
control, 3-fold cross-validated on OLID's mining side (2,000 + 2,000 tweets); held-out sets are scored only with
--held, after the choice.

    SAESCOPE_SHARED_DATA=../shared/data python bench/toxicity_rule_variants.py encode --sae RUN --layer 15 --out RUN.npz
    python bench/toxicity_rule_variants.py cv RUN1.npz RUN2.npz ... --json cv.json
    python bench/toxicity_rule_variants.py cv RUN1.npz ... --held --variant mean-fire-256 --k 10 --json held.json

`encode` stores each text's dense max- and mean-pooled codes (first token left out, as `mine` reads them; float16) for
the SAE and its control (RUN/control) on the mining side and on the held-out sides of five English sets.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from saescope.api.hits import scores
from saescope.api.rules import activation_scales, sparse_logistic

HELD = ("en_olid", "en_hasoc2019", "en_ethos", "en_stormfront", "en_wikitox_identity")
VARIANTS = {  # name: (pooled statistic, candidate ranking, number of candidates)
    "max-fire-256": ("max", "fire", 256),  # what `toxicity mine` writes as weightedN-kK
    "max-smd-256": ("max", "smd", 256),
    "max-fire-1024": ("max", "fire", 1024),
    "mean-fire-256": ("mean", "fire", 256),  # what `toxicity mine` writes as meanN-kK
    "both-fire-512": ("both", "fire", 512),
}


def encode(args: argparse.Namespace) -> None:
    import torch

    from saescope.api.scope import Scope
    from saescope.apps.toxicity.run import mining_side
    from saescope.core.data.labelled import group_split, load_labelled
    from saescope.core.io import load_saes
    from saescope.core.models import load_model

    saes = load_saes(args.sae, layers=[args.layer])
    control = load_saes(str(Path(args.sae) / "control"), layers=[args.layer])
    scope = Scope(load_model(saes[args.layer].meta["model"], dtype=args.model_dtype), saes)
    sets = {"mine": mining_side(load_labelled("en_olid"), "mine", 1.0, 0, 2000)}
    sets.update({name: group_split(load_labelled(name), seed=0)[1] for name in HELD})
    arrays: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for name, ds in sets.items():
            arrays[f"{name}/labels"] = ds.labels.astype(np.int8)
            dense = {(w, pool): np.zeros((len(ds), saes[args.layer].cfg.d_sae), dtype=np.float16)
                     for w in ("sae", "control") for pool in ("max", "mean")}
            for idx, got in scope.iter_pooled(ds.texts, layers=[args.layer], pool="max+mean", skip_first_token=True,
                                              sae_sets={"sae": saes, "control": control}, batch_size=32,
                                              max_length=256, desc=name):
                for (w, pool), table in dense.items():  # one encoding, both statistics
                    table[np.asarray(idx)] = got[w][args.layer][("max", "mean").index(pool)].float().cpu().numpy()
            arrays.update({f"{name}/{w}/{pool}": a for (w, pool), a in dense.items()})
    np.savez(args.out, **arrays)


def _table(raw, split: str, which: str, pool: str) -> np.ndarray:
    if pool == "both":
        return np.concatenate([_table(raw, split, which, "max"), _table(raw, split, which, "mean")], 1)
    return raw[f"{split}/{which}/{pool}"].astype(np.float32)


def _fit(x: np.ndarray, labels: np.ndarray, how: str, n_cand: int, ks: list[int]) -> dict:
    """Per K: (columns, weights per raw activation, bias), mined as `toxicity mine` mines weighted rules."""
    pos = labels == 1
    if how == "fire":
        fire = x > 0
        d = fire[pos].mean(0) - fire[~pos].mean(0)
    else:  # standardised difference of the means
        d = (x[pos].mean(0) - x[~pos].mean(0)) / (x.std(0) + 1e-6)
    cand = np.argsort(-np.abs(d), kind="stable")[:n_cand]
    values = x[:, cand]
    scales = activation_scales(values)
    return {k: (cand[cols], np.asarray(w) / scales[cols], b)
            for k, (cols, w, b) in sparse_logistic(values / scales, labels, ks).items()}


def _balanced(x: np.ndarray, rule: tuple, labels: np.ndarray) -> float:
    cols, w, b = rule
    return scores(x[:, cols] @ w + b > 0, labels)["balanced_accuracy"]


def cv(args: argparse.Namespace) -> None:
    ks = [int(k) for k in args.k.split(",")]
    variants = {v: VARIANTS[v] for v in (args.variant or VARIANTS)}
    out: dict = {"held": args.held, "ks": ks, "runs": {}}
    start = time.perf_counter()
    for path in args.npz:
        raw = np.load(path)
        labels = raw["mine/labels"].astype(int)
        res = out["runs"][path] = {}
        for which in ("sae", "control"):
            for name, (pool, how, n_cand) in variants.items():
                x = _table(raw, "mine", which, pool)
                if not args.held:
                    fold = np.random.default_rng(0).permutation(len(labels)) % 3
                    got: dict[int, list[float]] = {k: [] for k in ks}
                    for i in range(3):
                        train, test = fold != i, fold == i
                        for k, rule in _fit(x[train], labels[train], how, n_cand, ks).items():
                            got[k].append(_balanced(x[test], rule, labels[test]))
                    for k in ks:
                        res.setdefault(f"{name}-k{k}", {})[which] = float(np.mean(got[k]))
                    continue
                for k, rule in _fit(x, labels, how, n_cand, ks).items():
                    for held in HELD:
                        score = _balanced(_table(raw, held, which, pool), rule, raw[f"{held}/labels"].astype(int))
                        res.setdefault(f"{name}-k{k}", {}).setdefault(held, {})[which] = score
        for key, row in res.items():
            if args.held:
                print(f"{path} {key:20s} " + "  ".join(f"{s} {v['sae']:.3f}/{v['control']:.3f}" for s, v in row.items()))
            else:
                print(f"{path} {key:20s} SAE {row['sae']:.3f} control {row['control']:.3f} margin {row['sae'] - row['control']:+.3f}")
    out["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.json).write_text(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode")
    enc.add_argument("--sae", required=True, help="a run folder with its random control in RUN/control")
    enc.add_argument("--layer", type=int, default=15)
    enc.add_argument("--model-dtype", default="bf16")
    enc.add_argument("--out", required=True)
    val = sub.add_parser("cv")
    val.add_argument("npz", nargs="+")
    val.add_argument("--k", default="5,10,20")
    val.add_argument("--variant", action="append", choices=sorted(VARIANTS))
    val.add_argument("--held", action="store_true", help="mine on all the mining texts and score the held-out sets")
    val.add_argument("--json", required=True)
    args = ap.parse_args()
    if args.command == "encode":
        encode(args)
    else:
        cv(args)


if __name__ == "__main__":
    main()
