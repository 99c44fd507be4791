"""Issue 35's recipe and ablation: SAEs that can carry toxicity, and the rules mined on them on natural posts.

Each row trains one layer's SAE (`train`, from the LM or from a cache), makes its random control (`control random`),
mines rules on natural English tweets (`toxicity mine --data en_olid`: 2,000 + 2,000 of OLID's train split) and scores
them (`toxicity eval`: OLID's own test split, and the held-out side of sets the rules were not mined on: HASOC 2019
by default) beside the control's rules, a bag of words, a residual probe and always-positive; then FVU by domain
(`quality`'s prose, maths, code and non-English held-out text) so that the comments' cost elsewhere shows.

A row is NAME:FIELD=VALUE,... over TrainConfig's fields (data=comments, preset=16x-k50, max_tokens=1048576, ...).
Resumable: a finished step's files are kept.

    SAESCOPE_SHARED_DATA=../shared/data python bench/toxicity_recipe.py --layer 15 \
        --row base:preset=8x-k32,max_tokens=262144 --row comments:data=comments,preset=8x-k32,max_tokens=262144 \
        --json bench/results/toxicity-recipe.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path

from saescope.api.controls import ControlConfig, run_control
from saescope.api.quality import QualityConfig, run_quality
from saescope.apps.toxicity import MineConfig, RulesEvalConfig, run_mine, run_rules_eval
from saescope.core.io import RunDir, read_summary
from saescope.core.train import TrainConfig, run_train


def _row(spec: str) -> tuple[str, dict]:
    name, _, body = spec.partition(":")
    types = {f.name: str(f.type) for f in fields(TrainConfig)}
    values: dict = {}
    for item in filter(None, body.split(",")):
        key, _, raw = item.partition("=")
        values[key] = int(raw) if "int" in types[key] else float(raw) if "float" in types[key] else raw
    return name, values


def _timed(seconds: dict, key: str, fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    seconds[key] = round(time.perf_counter() - start, 1)
    return out


def _figures(result: dict) -> dict:
    """Per rule of the SAE and of the control, F1 and balanced accuracy; the baselines'."""
    pick = lambda rules: {n: {"f1": r["f1"], "balanced_accuracy": r["balanced_accuracy"]} for n, r in rules.items()}  # noqa: E731
    return {"n_texts": result["evaluation"]["n_texts"], "source": result["evaluation"]["source"],
            "sae": pick(result["sets"]["sae"]["rules"]), "control": pick(result["sets"]["control"]["rules"]),
            "baselines": {n: {"f1": b["f1"], "balanced_accuracy": b["balanced_accuracy"]}
                          for n, b in result["baselines"].items()},
            "chosen_layer": result["sets"]["sae"]["choice"]["chosen_layer"],
            "best_delta": max(result["sets"]["sae"]["choice"]["layer_best_delta"].values())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", default="15")
    p.add_argument("--row", action="append", required=True, help="NAME:FIELD=VALUE,...")
    p.add_argument("--mine", default="en_olid")
    p.add_argument("--also", action="append", default=None, help="sets the rules were not mined on (default en_hasoc2019)")
    p.add_argument("--control", default="random", choices=["random", "frozen-decoder", "soft-frozen"],
                   help="the control beside the SAE; a trained one (frozen-decoder) trains the row again with its "
                        "decoder frozen at its random init, and its rows are NAME@KIND in the JSON")
    p.add_argument("--work", default="bench/work/toxicity")
    p.add_argument("--json", required=True)
    a = p.parse_args()
    also = a.also or ["en_hasoc2019"]
    work = Path(a.work)
    out: dict = {"mine": a.mine, "also": also, "layer": a.layer, "rows": {}}
    if Path(a.json).is_file():
        out = json.loads(Path(a.json).read_text())
    for spec in a.row:
        name, values = _row(spec)
        run, seconds = work / name, {}
        if read_summary(run) is None:
            resume = RunDir(run).has_run()  # a row killed while training goes on from its checkpoint
            length = {"max_tokens": values["max_tokens"]} if "max_tokens" in values else {}
            cfg = TrainConfig.resumed(run, **length) if resume else TrainConfig(layers=a.layer, out=str(run), **values)
            _timed(seconds, "train", lambda: run_train(cfg, resume=resume))
        trained_control = a.control != "random"
        control = run / ("control" if not trained_control else f"control-{a.control}")
        if trained_control and read_summary(control) is None:
            _timed(seconds, "control", run_control, ControlConfig(kind=a.control, like=str(run), out=str(control)))
        elif not trained_control and not (control / f"layer{a.layer}.json").is_file():
            run_control(ControlConfig(kind="random", like=str(run), out=str(control)))
        rules = run / "toxicity" / "rules.json"
        if not rules.is_file():
            print(_timed(seconds, "mine", run_mine, MineConfig(sae=str(run), data=a.mine, out=str(rules))).text())
        evaluation = run / "toxicity" / ("eval.json" if not trained_control else f"eval-{a.control}.json")
        if not evaluation.is_file():
            print(_timed(seconds, "eval", run_rules_eval, RulesEvalConfig(rules=str(rules), control=str(control), draws=3,
                                                                          also=also, json=str(evaluation))).text())
        quality = run / "quality-domains.json"
        if not quality.is_file() and not trained_control:
            _timed(seconds, "fvu by domain", run_quality, QualityConfig(sae=str(run), control=str(control),
                                                                        tasks=["hatecheck_en"], absorption_words=0,
                                                                        out=str(quality)))
        result = json.loads(evaluation.read_text())
        domains = json.loads(quality.read_text()) if quality.is_file() else {"layers": None}
        summary = read_summary(run)
        key = name if not trained_control else f"{name}@{a.control}"
        out["rows"][key] = {"train": values, "train_tokens": summary["tokens"], "train_tok_s": summary["tokens_per_s"],
                             "held_out": _figures(result),
                             "also": {n: _figures(r) for n, r in result.get("also", {}).items()},
                             "fvu_by_domain": domains["layers"],
                             "control": a.control,
                             "seconds": {**out["rows"].get(key, {}).get("seconds", {}), **seconds}}
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"{'row':<22} {'set':<26} {'best SAE rule':<14} {'bal.acc':>7} {'control':>7} {'BoW':>6} {'probe':>6}")
    for name, row in out["rows"].items():
        for target in [row["held_out"], *row["also"].values()]:
            best = max(target["sae"], key=lambda n: target["sae"][n]["balanced_accuracy"])
            ctl = max(v["balanced_accuracy"] for v in target["control"].values())
            b = target["baselines"]
            print(f"{name:<22} {target['source'][:26]:<26} {best:<14} {target['sae'][best]['balanced_accuracy']:7.3f} "
                  f"{ctl:7.3f} {b['lexical']['balanced_accuracy']:6.3f} "
                  f"{b.get('probe', {}).get('balanced_accuracy', float('nan')):6.3f}")
    print(f"written {a.json}")


if __name__ == "__main__":
    main()
