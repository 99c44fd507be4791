"""Texts per second of `saescope toxicity classify` (only the rule's features, the full encoder on candidate tokens
only) against the same decisions through the full encoder at the rule's layers (Scope.iter_pooled with max
pooling, what mining uses), and a check that the decisions agree.

    python bench/toxicity_speed.py --rules runs/reference-1m/toxicity/rules.json --data hatecheck_en --rule layer23-k10
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from saescope.api.hits import encode_labelled
from saescope.api.rules import RuleSet
from saescope.api.scope import Scope
from saescope.apps.toxicity import RuleClassifier
from saescope.core.data.labelled import load_labelled
from saescope.core.files import atomic_write_json


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rules", required=True)
    p.add_argument("--data", default="hatecheck_en")
    p.add_argument("--rule", action="append", help="rules to time (default: the file's default)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out")
    a = p.parse_args()
    rules = RuleSet.load(a.rules)
    data = load_labelled(a.data)
    out = {"data": a.data, "n_texts": len(data), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "rules": {}}
    for name in a.rule or [rules.default]:
        rule = rules.rule(name)
        scope = Scope.load(rules.sae, rules.model, layers=rule.layers)
        clf = RuleClassifier(scope, rules, name)
        list(clf.decisions(data.texts[:64], batch_size=a.batch_size, progress=False))  # warm-up
        clf.tokens = clf.candidate_tokens = 0
        start = time.perf_counter()
        fast = np.array([d.positive for d in clf.decisions(data.texts, batch_size=a.batch_size, progress=False)])
        fast_s = time.perf_counter() - start
        start = time.perf_counter()
        enc = encode_labelled(scope, data, layers=rule.layers, residual=False, batch_size=a.batch_size, progress=False)
        full = rule.predict(enc.hits["sae"])
        full_s = time.perf_counter() - start
        row = {"features": len(rule.features), "layers": rule.layers, "fast_texts_per_s": len(data) / fast_s,
               "full_texts_per_s": len(data) / full_s, "speedup": full_s / fast_s,
               "candidate_token_share": clf.candidate_tokens / max(clf.tokens, 1),
               "decisions_differ": int((fast != full).sum())}
        out["rules"][name] = row
        print(json.dumps({name: row}))
    if a.out:
        atomic_write_json(Path(a.out), out)


if __name__ == "__main__":
    main()
