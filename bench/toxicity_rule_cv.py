"""Which rule family to use, chosen on the mining texts alone: K-fold cross-validation of every rule `toxicity mine`
writes (OR, sparse over fires, weighted over max activations), for several SAE sets and their controls, on the mining
side of a labelled set (default: OLID's train side, 2,000 + 2,000 as `toxicity mine` draws them). No held-out or
other set is read: this is how the weighted family was chosen without looking at HASOC.

    SAESCOPE_SHARED_DATA=../shared/data python bench/toxicity_rule_cv.py --layer 15 \\
        --sae runs/a --sae runs/b --json bench/results/toxicity-rule-cv.json

Each --sae is a run whose `control/` folder holds its random control (`saescope control random --like RUN`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from saescope.api.hits import encode_labelled
from saescope.api.rules import cross_validated
from saescope.api.scope import Scope
from saescope.apps.toxicity.run import mining_side
from saescope.core.data.labelled import load_labelled
from saescope.core.io import load_saes
from saescope.core.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sae", action="append", required=True, help="a run folder with its random control in RUN/control")
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--data", default="en_olid")
    ap.add_argument("--per-class", type=int, default=2000)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--model-dtype", default="bf16")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    side = mining_side(load_labelled(args.data), "mine", 1.0, 0, args.per_class)
    runs = {run: (load_saes(run, layers=[args.layer]), load_saes(Path(run) / "control", layers=[args.layer]))
            for run in args.sae}
    lm = load_model(next(iter(runs.values()))[0][args.layer].meta["model"], dtype=args.model_dtype)
    start = time.perf_counter()
    out: dict = {"data": side.name, "n_texts": len(side), "layer": args.layer, "folds": args.folds, "runs": {}}
    for run, (saes, control) in runs.items():  # one LM pass per run: its SAE and its control
        enc = encode_labelled(Scope(lm, saes), side, control=control, residual=False, activations=True)
        for which, name in (("sae", run), ("control", run + "@control")):
            row = out["runs"][name] = cross_validated(enc.hits[which], side.labels, folds=args.folds, multi_layer=False)
            print(f"{name}: " + "  ".join(f"{k} {row[k]:.3f}" for k in row if k.endswith(("k5", "k10"))), flush=True)
    out["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
