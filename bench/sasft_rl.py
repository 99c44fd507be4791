"""SASFT and steered-negative RL on SmolLM2-135M-Instruct, each beside its controls, same data, steps and seed.

    python bench/sasft_rl.py sasft --sae runs/sm-1m --layer 15 --features 3274,4408,4370
    python bench/sasft_rl.py rl --sae runs/sm-1m --layer 15 --feature 3274 --alpha 170

sasft: plain SFT (lambda 0), SASFT, SASFT with random directions of the same norms; rl: GRPO with the steered negative,
plain GRPO, GRPO with a random-direction negative. Each arm is one `saescope sasft` / `saescope rl` run (their folders
under --out); the table (and JSON beside it) gathers their before/after held-out figures and per-step logs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run(args: list[str]) -> float:
    start = time.perf_counter()
    print("+ saescope " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "saescope", *args], check=True)
    return time.perf_counter() - start


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def sasft(a) -> dict:
    common = ["--sae", a.sae, "--layer", str(a.layer), "--features", a.features, "--max-steps", str(a.steps),
              "--eval-prompts", str(a.prompts), "--arc", str(a.arc), "--seed", "0", "--max-length", str(a.max_length), "--data", a.data] + (["--lora"] if a.lora else [])
    arms = {"plain SFT": ["--lambda", "0"], "SASFT": ["--lambda", str(a.lam)],
            "SASFT, random directions": ["--lambda", str(a.lam), "--control", a.control]}
    out = {}
    for i, (name, extra) in enumerate(arms.items()):
        folder = Path(a.out) / name.replace(" ", "-").replace(",", "")
        if not (folder / "sasft.json").exists():
            run(["sasft", *common, *extra, *(["--skip-before"] if i else []), "--out", str(folder)])
        s = json.loads((folder / "sasft.json").read_text())
        log = [json.loads(x) for x in (folder / "train_log.jsonl").read_text().splitlines()]
        steps = [x for x in log if "sasft/ce" in x]
        out[name] = {"before": s["heldout_before"], "after": s["heldout_after"], "seconds": s["seconds"],
                     "seconds_per_step": s["seconds_per_step"], "alpha": s["suppression"]["alpha"],
                     "fire_rate_first5": sum(x["sasft/fire_rate"] for x in steps[:5]) / 5,
                     "fire_rate_last5": sum(x["sasft/fire_rate"] for x in steps[-5:]) / 5,
                     "ce_last5": sum(x["sasft/ce"] for x in steps[-5:]) / 5}
    keys = ("loop_rate", "distinct_2", "language_rate", "feature_fire_rate", "heldout_loss", "arc_easy")
    base = next(v["before"] for v in out.values() if v["before"])
    lines = ["| model | " + " | ".join(keys) + " | train fire rate (first/last 5 steps) | s/step |", "|---" * (len(keys) + 3) + "|",
             "| base (before) | " + " | ".join(_fmt(base.get(k)) for k in keys) + " | | |"]
    for name, v in out.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(v["after"].get(k)) for k in keys)
                     + f" | {v['fire_rate_first5']:.3f} / {v['fire_rate_last5']:.3f} | {v['seconds_per_step']:.2f} |")
    return {"arms": out, "table": "\n".join(lines)}


def rl(a) -> dict:
    common = ["--max-steps", str(a.steps), "--group-size", str(a.group), "--prompts-per-step", str(a.prompts_per_step),
              "--max-new-tokens", str(a.new_tokens), "--eval-problems", str(a.problems), "--reward", a.reward,
              "--seed", "0", "--lora"]
    steer = ["--sae", a.sae, "--layer", str(a.layer), "--feature", str(a.feature), "--alpha", str(a.alpha)]
    arms = {"steered negative": steer, "plain GRPO": ["--model", "smollm2-135m-instruct", "--no-steered-negative"],
            "random-direction negative": [*steer, "--control", a.control]}
    out = {}
    for name, extra in arms.items():
        folder = Path(a.out) / name.replace(" ", "-")
        if not (folder / "rl.json").exists():
            run(["rl", *common, *extra, "--out", str(folder)])
        s = json.loads((folder / "rl.json").read_text())
        log = [json.loads(x) for x in (folder / "train_log.jsonl").read_text().splitlines()]
        steps = [x for x in log if "reward" in x]
        out[name] = {"before": s["heldout_before"], "after": s["heldout_after"], "seconds_per_step": s["seconds_per_step"],
                     "reward_curve": [x.get("rollouts/normal_reward") for x in steps],
                     "loop_curve": [x.get("rollouts/normal_loop_rate") for x in steps],
                     "steered_loop_curve": [x.get("rollouts/steered_loop_rate") for x in steps]}
    def half(xs, first):
        xs = [x for x in xs if x is not None]
        h = xs[: len(xs) // 2] if first else xs[len(xs) // 2 :]
        return sum(h) / max(len(h), 1)
    lines = ["| run | held-out accuracy before -> after | loop rate before -> after | distinct-2 after | normal-rollout reward (1st half / 2nd half) | normal-rollout loop rate (1st / 2nd half) | steered loop rate | s/step |",
             "|---|---|---|---|---|---|---|---|"]
    for name, v in out.items():
        b, f = v["before"], v["after"]
        steered = [x for x in v["steered_loop_curve"] if x is not None]
        lines.append(f"| {name} | {b['accuracy']:.3f} -> {f['accuracy']:.3f} | {b['loop_rate']:.3f} -> {f['loop_rate']:.3f} | "
                     f"{f['distinct_2']:.3f} | {half(v['reward_curve'], True):.3f} / {half(v['reward_curve'], False):.3f} | "
                     f"{half(v['loop_curve'], True):.3f} / {half(v['loop_curve'], False):.3f} | "
                     f"{(sum(steered) / len(steered)) if steered else float('nan'):.2f} | {v['seconds_per_step']:.1f} |")
    return {"arms": out, "table": "\n".join(lines)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["sasft", "rl"])
    p.add_argument("--sae", required=True)
    p.add_argument("--control", required=True, help="the control of the SAEs (saescope control random --like SAE): the random arms")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--features", default="")
    p.add_argument("--feature", type=int, default=0)
    p.add_argument("--alpha", type=float, default=170.0)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--problems", type=int, default=48)
    p.add_argument("--arc", type=int, default=100)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--data", default="responses:en:gpt-4o-2024-08-06")
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reward", default="exact-match")
    p.add_argument("--out", default="runs/bench-sasft")
    a = p.parse_args()
    result = sasft(a) if a.what == "sasft" else rl(a)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"{a.what}.json").write_text(json.dumps(result, indent=1))
    print(result["table"])


if __name__ == "__main__":
    main()
