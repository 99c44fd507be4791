"""The ground-truth benchmark (issue 34): how many known features each SAE kind recovers, beside the controls of
Korznikov et al. 2026 and sae-lens's trainers on the same activations.

1. `groundtruth make`: SAMPLES activations in d dimensions from 8d known features (power-law firing, correlated and
   hierarchical pairs, noise, an offset; saescope.core.data.synthetic), held-out samples drawn at scoring time;
2. `train --activations` of every kind at each k, with the library's defaults (learning rate, the per-token warm-up of
   the kinds whose selection is batch-wide or per latent), on steps of --batch-size x 256 rows (default 1,024: the
   batch of SAELens's synthetic trainer; the default for text, 16 sequences, gives a 500k-sample set a few hundred
   steps);
3. `control frozen-decoder` and `control soft-frozen` of each trained run (the one control mechanism), and the random
   control `groundtruth score` adds;
4. sae-lens's trainer of the same kind (--peer-python: the peers' venv) on the same file, the same tokens, batch and
   learning rate (equal tokens), and again on the tokens it trains in saescope's wall time (equal time); with
   --peers sae-lens,sparsify also sparsify's top-k trainer on the same rows and tokens (bench/peer_sparsify_activations.py:
   its defaults, and Adam at saescope's learning rate);
5. `groundtruth score` of them all: recovered share (a decoder row at cosine > 0.9), mean best cosine, MCC,
   absorption on the parent/child pairs, explained variance, L0, training tok/s.

Resumable: every finished step is kept and reused.

    python bench/ground_truth.py --work bench/work/gt --json bench/results/ground-truth.json \
        --peer-python /work/peers-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from saescope.api.controls import ControlConfig, run_control
from saescope.apps.groundtruth import MakeConfig, ScoreConfig, run_make, run_score
from saescope.core.io import read_summary
from saescope.core.train import TrainConfig, run_train
from saescope.core.train.config import budget_lr


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def run_peer(python: str, script: str, options: list[str], out: Path) -> dict:
    """A peer script in the peers' venv (kept when its timing.json is there): its timing.json."""
    if not (out / "timing.json").is_file():
        subprocess.run([python, str(Path(__file__).with_name(script)), *options, "--out", str(out)], check=True)
    return json.loads((out / "timing.json").read_text())


def peer(python: str, activations: Path, arch: str, expansion: int, k: int, tokens: int, batch: int, lr: float,
         out: Path) -> dict:
    return run_peer(python, "peer_saelens_activations.py", ["--activations", str(activations), "--arch", arch, "--expansion",
                    str(expansion), "--k", str(k), "--tokens", str(tokens), "--batch", str(batch), "--lr", str(lr)], out)


def sparsify(python: str, activations: Path, expansion: int, k: int, tokens: int, batch: int, lr: float | None,
             out: Path) -> dict:
    """sparsify's top-k trainer: its defaults (signum, its learning rate) when lr is None, else Adam at lr."""
    optim = ["--optimizer", "signum"] if lr is None else ["--optimizer", "adam", "--lr", str(lr)]
    return run_peer(python, "peer_sparsify_activations.py", ["--activations", str(activations), "--expansion",
                    str(expansion), "--k", str(k), "--tokens", str(tokens), "--batch", str(batch), *optim], out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="bench/work/gt")
    p.add_argument("--json", required=True)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--samples", type=int, default=500_000)
    p.add_argument("--passes", type=float, default=5.0, help="training tokens = passes x samples")
    p.add_argument("--batch-size", type=int, default=4, help="rows per step / 256 (train's --batch-size)")
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--k", default="6", help="comma-separated: the L0 sweep")
    p.add_argument("--arch", default="topk,batchtopk,jumprelu,matryoshka")
    p.add_argument("--controls", default="frozen-decoder,soft-frozen")
    p.add_argument("--peer-python", default=None, help="the peers' venv python: sae-lens trains beside saescope")
    p.add_argument("--peers", default="sae-lens", help="with --peer-python: sae-lens and/or sparsify (top-k only: its "
                   "defaults, and Adam at saescope's learning rate)")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    synthetic = work / "set"
    if not (synthetic / "synthetic.json").is_file():
        times["make"] = timed(run_make, MakeConfig(out=str(synthetic), d=a.d, n_features=8 * a.d, samples=a.samples))
    activations = synthetic / "activations.npy"
    tokens = int(a.passes * a.samples)
    results = []
    for k in [int(v) for v in a.k.split(",")]:
        for kind in a.arch.split(","):
            run = work / f"{kind}-k{k}"
            cfg = TrainConfig(activations=str(activations), out=str(run), preset=None, arch=kind, k=k,
                              expansion=a.expansion, max_tokens=tokens, batch_size=a.batch_size)
            if read_summary(run) is None:
                times[f"train {run.name}"] = timed(run_train, cfg)
            step_tokens = cfg.batch_size * cfg.ctx_len
            lr = budget_lr(a.expansion * a.d, tokens // step_tokens)
            saes = [str(run)]
            for control in [c for c in a.controls.split(",") if c]:
                folder = work / f"{kind}-k{k}-{control}"
                if read_summary(folder) is None:
                    times[f"control {folder.name}"] = timed(run_control, ControlConfig(kind=control, like=str(run),
                                                                                       out=str(folder)))
                saes.append(str(folder))
            peers: dict[str, tuple[str, dict]] = {}  # a peer's SAE path: its role and its timing
            if a.peer_python and "sparsify" in a.peers and kind == "topk":
                for role, peer_lr in (("sparsify, its defaults", None), ("sparsify, adam", lr)):
                    folder = work / f"sparsify-{'adam' if peer_lr else 'default'}-k{k}"
                    peers[str(folder / "sparsify")] = (role, sparsify(a.peer_python, activations, a.expansion, k, tokens,
                                                                      step_tokens, peer_lr, folder))
            if a.peer_python and "sae-lens" in a.peers:
                equal_tokens = work / f"saelens-{kind}-k{k}"
                timing = peer(a.peer_python, activations, kind, a.expansion, k, tokens, step_tokens, lr, equal_tokens)
                peers[str(equal_tokens / "saelens")] = ("sae-lens, equal tokens", timing)
                ours = read_summary(run)["elapsed_s"]
                same_time = int(ours * timing["tok_s"]) // step_tokens * step_tokens
                equal_time = work / f"saelens-{kind}-k{k}-equal-time"
                peers[str(equal_time / "saelens")] = ("sae-lens, equal time", peer(
                    a.peer_python, activations, kind, a.expansion, k, max(step_tokens, same_time), step_tokens, lr,
                    equal_time))
            saes += list(peers)
            start = time.perf_counter()
            scored = run_score(ScoreConfig(synthetic=str(synthetic), sae=saes, out=str(work / f"scores-{kind}-k{k}.json")))
            times[f"score {kind}-k{k}"] = time.perf_counter() - start
            print(scored.text(), flush=True)
            for row in scored.rows:
                role = ("saescope" if row["name"] == str(run) else row["control"] or
                        ("random" if row["name"].startswith("random control") else None))
                if row["name"] in peers:
                    role, timing = peers[row["name"]]
                    row = {**row, "train_tok_s": timing["tok_s"], "train_tokens": timing["tokens"]}
                results.append({"arch": kind, "k_asked": k, "role": role, "lr": lr, "step_tokens": step_tokens, **row})
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "python": sys.version.split()[0]},
           "synthetic": json.loads((synthetic / "synthetic.json").read_text()), "tokens": tokens,
           "expansion": a.expansion, "rows": results, "seconds": times}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"{'arch':>10} {'k':>3} {'role':>24} {'recovered':>9} {'best cos':>8} {'MCC':>6} {'absorb':>6} {'EV':>6} "
          f"{'L0':>6} {'tok/s':>7}")
    for r in results:
        tok = f"{r['train_tok_s']:7.0f}" if r.get("train_tok_s") else f"{'-':>7}"
        print(f"{r['arch']:>10} {r['k_asked']:>3} {r['role']:>24} {r['recovered']:9.3f} {r['mean_best_cos']:8.3f} "
              f"{r['mcc']:6.3f} {r['absorption']:6.3f} {r['explained_variance']:6.3f} {r['l0']:6.1f} {tok}")
    print(f"written {a.json}")


if __name__ == "__main__":
    main()
