"""The learning rate of short runs, measured on held-out reconstruction (issue 35's lever, issue 15's rule revisited).

`saescope train` picks batch and learning rate from --max-tokens (core/train/config.py): runs under 1M tokens get
about 200-256 steps and Gao et al.'s width-scaled rate times min(4, sqrt(4096 / steps)) (times LR_SCALE, 3 since
this bench measured it; the JSON records the scale its multipliers are of), so every short run sits at the 4x cap.
This bench trains one layer from an activation cache at several budgets and several multiples of that default, a
few seeds each, and measures FVU where no run was trained: the corpus's held-out split and the quality
suite's maths, code and non-English prompts, all sets in one LM pass per domain, and the share of latents that never
fire on the held-out split's tokens (a rate too high for a short run's AuxK threshold kills latents: --dead-tokens).
Nothing here reads a toxicity set: the choice it supports is made on reconstruction alone.

    SAESCOPE_SHARED_DATA=../shared/data python bench/short_run_lr.py --cache CACHE --layer 15 \
        --budgets 131072,262144,1048576 --multipliers 1,2,3,4 --seeds 0,1 --json bench/results/short-run-lr.json

Resumable: finished runs are kept in --work and re-measured only when their FVU is not yet in the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from saescope.api.evaluate import fvu_on_texts
from saescope.api.quality import DOMAINS, domain_texts
from saescope.api.scope import model_of
from saescope.core.data import batches, iter_texts
from saescope.core.io import load_saes, read_summary
from saescope.core.models import capture, load_model
from saescope.core.sae import default_lr
from saescope.core.train import TrainConfig, run_train
from saescope.core.train.config import LR_SCALE, budget_batch_size, budget_lr


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _never_fired(lm, sets: dict, layer: int, n_tokens: int) -> dict[str, float]:
    """Per SAE set: the share of its latents that fire on none of about n_tokens held-out tokens."""
    fired = {n: torch.zeros(s[layer].cfg.d_sae, dtype=torch.bool) for n, s in sets.items()}
    done = 0
    with torch.inference_mode():
        for ids in batches(iter_texts(None, split="eval"), lm.tokenizer, ctx_len=128, batch_size=32, seed=1234,
                           shuffle_buffer=1):
            x = capture(lm.model, ids.to(lm.device), [layer])[layer].flatten(0, 1).float()
            for n, saes in sets.items():
                code = saes[layer].encode(x)
                fired[n][code.indices[code.values > 0].unique().cpu()] = True
            done += ids.numel()
            if done >= n_tokens:
                break
    return {n: float((~f).float().mean()) for n, f in fired.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="a `saescope cache` folder holding --layer")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--preset", default="8x-k32")
    p.add_argument("--budgets", default="131072,262144,1048576")
    p.add_argument("--multipliers", default="1,2,3,4", help="multiples of the default learning rate of each budget")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--dead-tokens", type=int, default=None, help="train's --dead-tokens (default: train's)")
    p.add_argument("--auxk-share", type=float, default=1.0, help="train's --auxk-share (runs below 1 are named -aSHARE)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per step (default: train's, which follows the budget); more steps, same tokens")
    p.add_argument("--fvu-tokens", type=int, default=16384, help="held-out tokens per domain")
    p.add_argument("--model-dtype", default="bf16", help="the LM's dtype for the held-out FVU (the cache's, by default)")
    p.add_argument("--work", default="bench/work/short-run-lr")
    p.add_argument("--json", required=True)
    a = p.parse_args()
    multipliers = [float(m) for m in a.multipliers.split(",")]
    out = json.loads(Path(a.json).read_text()) if Path(a.json).is_file() else {"runs": {}}
    out.update(cache=a.cache, layer=a.layer, preset=a.preset, fvu_tokens=a.fvu_tokens, model_dtype=a.model_dtype)
    out.setdefault("lr_scale", LR_SCALE)  # the multipliers are of budget_lr, which includes it (1 before it existed)
    runs: dict[str, Path] = {}
    d_model = json.loads((Path(a.cache) / "cache.json").read_text())["d_model"]
    for budget in _ints(a.budgets):
        for m in multipliers:
            for seed in _ints(a.seeds):
                name = (f"{a.preset}-t{budget}" + (f"-b{a.batch_size}" if a.batch_size else "")
                        + (f"-d{a.dead_tokens}" if a.dead_tokens else "")
                        + (f"-a{a.auxk_share:g}" if a.auxk_share < 1 else "") + f"-x{m:g}-s{seed}")
                run = Path(a.work) / name
                runs[name] = run
                if read_summary(run) is None:
                    probe = TrainConfig(activations=a.cache, layers=str(a.layer), preset=a.preset, max_tokens=budget)
                    steps = budget // ((a.batch_size or budget_batch_size(budget, probe.ctx_len)) * probe.ctx_len)
                    lr = budget_lr(probe.width_and_k(d_model)[0], steps) * m
                    start = time.perf_counter()
                    run_train(TrainConfig(activations=a.cache, layers=str(a.layer), preset=a.preset, max_tokens=budget,
                                          batch_size=a.batch_size, dead_tokens=a.dead_tokens, seed=seed, lr=lr,
                                          auxk_share=a.auxk_share, out=str(run)))
                    print(f"{name}: lr {lr:.3g}, trained in {time.perf_counter() - start:.0f} s")
                train_cfg, summary = json.loads((run / "train.json").read_text()), read_summary(run)
                log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()[-5:]]
                out["runs"].setdefault(name, {}).update(
                    budget=budget, multiplier=m, seed=seed, lr=train_cfg["lr"], batch_size=train_cfg["batch_size"],
                    auxk_share=train_cfg.get("auxk_share", 1.0), train_s=summary.get("elapsed_s"),
                    dead_tokens=train_cfg["dead_tokens"],
                    steps=summary["steps"],  # the train FVU: the last 5 logged steps' mean
                    train_fvu=statistics.mean(e["layers"][str(a.layer)]["fvu"] for e in log))
    todo = [n for n in runs if "never_fired" not in out["runs"][n]]
    if todo:
        sets = {n: load_saes(str(runs[n]), layers=[a.layer]) for n in todo}
        lm = load_model(model_of(next(iter(sets.values())), None), dtype=a.model_dtype)
        fvu: dict[str, dict[str, float]] = {n: {} for n in todo}
        for domain, texts in [("held_out", iter_texts(None, split="eval")),
                              *((d, domain_texts(d)) for d in DOMAINS)]:
            start = time.perf_counter()
            per_set = fvu_on_texts(lm, sets, texts, n_tokens=a.fvu_tokens)
            for n in todo:
                fvu[n][domain] = per_set[n][a.layer]
            print(f"FVU on {domain}: {len(todo)} SAEs in {time.perf_counter() - start:.0f} s")
        for n, share in _never_fired(lm, sets, a.layer, a.fvu_tokens).items():
            out["runs"][n].update(fvu=fvu[n], never_fired=share)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1))
    domains = ["held_out", *DOMAINS]
    print(f"{'budget':>8} {'steps':>6} {'x lr':>5} {'lr':>9} {'train':>7} " + " ".join(f"{d:>12}" for d in domains)
          + f" {'never fired':>11}  (mean of seeds)")
    for budget in _ints(a.budgets):
        for m in multipliers:
            rows = [r for r in out["runs"].values() if r["budget"] == budget and r["multiplier"] == m and "fvu" in r
                    and (a.batch_size is None or r["batch_size"] == a.batch_size)
                    and r.get("auxk_share", 1.0) == a.auxk_share]
            if rows:
                mean = lambda key: statistics.mean(r["fvu"][key] for r in rows)  # noqa: E731
                print(f"{budget:>8} {rows[0]['steps']:>6} {m:>5g} {rows[0]['lr']:>9.3g} {statistics.mean(r['train_fvu'] for r in rows):>7.4f} "
                      + " ".join(f"{mean(d):>12.4f}" for d in domains)
                      + f" {statistics.mean(r['never_fired'] for r in rows):>11.3f}")
    print(f"written {a.json} (Gao et al.'s lr at this width: {default_lr(d_model * int(a.preset.split('x')[0])):.3g})")


if __name__ == "__main__":
    main()
