"""The real-model table of issue 34: each SAE kind of bench/kinds.py's sweep (SmolLM2 layer 15, one activation cache)
beside the controls of Korznikov et al. 2026, with the trained SAEs' margins and their paired standard errors.

For each kind's run: a random control of its kind (`control random`), the run trained again with its decoder frozen at
its init (`control frozen-decoder`, from the same cache, the same tokens), then `eval` and `quality` with both controls
(`--control` twice). Resumable: finished steps are kept.

    SAESCOPE_SHARED_DATA=../shared/data python bench/kinds_controls.py --sweep bench/work/kinds/sweep \
        --json bench/results/kinds-controls-layer15.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from saescope.api.controls import ControlConfig, run_control
from saescope.api.evaluate import EvalConfig, run_eval
from saescope.api.quality import QualityConfig, run_quality
from saescope.core.io import read_summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", default="bench/work/kinds/sweep")
    p.add_argument("--arch", default="topk,batchtopk,jumprelu,matryoshka")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--json", required=True)
    a = p.parse_args()
    sweep = Path(a.sweep)
    out: dict = {"eval_tokens": a.eval_tokens, "kinds": {}, "seconds": {}}
    for kind in a.arch.split(","):
        run = sweep / f"{kind}-k{a.k}"
        random, frozen = sweep / f"{run.name}-random", sweep / f"{run.name}-frozen-decoder"
        if not random.is_dir():
            run_control(ControlConfig(kind="random", like=str(run), out=str(random)))
        if read_summary(frozen) is None:
            start = time.perf_counter()
            run_control(ControlConfig(kind="frozen-decoder", like=str(run), out=str(frozen)))
            out["seconds"][f"frozen-decoder {kind}"] = time.perf_counter() - start
        controls = [str(random), str(frozen)]
        figures = sweep / f"{run.name}-controls"
        if not (figures / "eval.json").is_file():
            start = time.perf_counter()
            print(run_eval(EvalConfig(sae=str(run), control=controls, n_tokens=a.eval_tokens, out=str(figures))).text())
            out["seconds"][f"eval {kind}"] = time.perf_counter() - start
        if not (figures / "quality.json").is_file():
            start = time.perf_counter()
            print(run_quality(QualityConfig(sae=str(run), control=controls, out=str(figures / "quality.json"))).text())
            out["seconds"][f"quality {kind}"] = time.perf_counter() - start
        ev = json.loads((figures / "eval.json").read_text())
        quality = json.loads((figures / "quality.json").read_text())
        out["kinds"][kind] = {"eval": {"layers": ev["layers"], "margins": ev["margins"]},
                              "quality": {"layers": quality["layers"], "margins": quality["margins"]},
                              "frozen_train_tok_s": read_summary(frozen)["tokens_per_s"],
                              "train_tok_s": read_summary(run)["tokens_per_s"]}
        Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"written {a.json}")


if __name__ == "__main__":
    main()
