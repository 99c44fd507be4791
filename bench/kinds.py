"""The four SAE kinds side by side at one layer, from one activation cache (issue 33's figures), and what the cache
costs and buys:

1. `saescope cache`: N tokens of the layer's residual stream (bf16), timed, beside a plain LM forward over the same
   batches (to the layer, as the cache runs it, and the whole model);
2. a top-k run with the LM in the loop (the same batch), timed: training speed from the cache against it;
3. `saescope sweep` of topk, batchtopk, jumprelu and matryoshka at the same k on the cache, each evaluated beside a
   random control of its kind (FVU, L0 mean and spread, dead/dense, CE recovered with zero and mean ablation) and
   measured by `quality` (sparse probing beside the control and the dense probe, first-letter absorption).

Every step is resumable: run it again after a kill and it goes on.

    python bench/kinds.py --work bench/work/kinds --tokens 1048576 --json bench/results/kinds-layer15.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch

from saescope.api.sweep import SweepConfig, run_sweep
from saescope.core.activation_cache import CacheConfig, read_cache_info, run_cache
from saescope.core.data import batches, iter_texts
from saescope.core.io import RunDir, read_summary
from saescope.core.models import capture, load_model
from saescope.core.train import TrainConfig, run_train


def forward_speed(model_dtype: str, layer: int, tokens: int, batch_size: int, ctx_len: int) -> dict:
    """tok/s of the LM over the training stream's first batches: stopped after `layer` (what the cache runs) and whole."""
    lm = load_model(None, dtype=model_dtype)
    stream = batches(iter_texts(None), lm.tokenizer, ctx_len=ctx_len, batch_size=batch_size, seed=0)
    ids = [next(stream) for _ in range(max(1, tokens // (batch_size * ctx_len)))]
    out = {}
    for name, stop in (("to_layer", True), ("whole_model", False)):
        capture(lm.model, ids[0], [layer], stop_early=stop)  # warm-up
        start = time.perf_counter()
        for b in ids:
            capture(lm.model, b, [layer], stop_early=stop)
        out[name] = sum(b.numel() for b in ids) / (time.perf_counter() - start)
    return out


def speed_rounds(cache: Path, work: Path, kinds: list[str], k: int, expansion: int, layer: int, tokens: int,
                 batch_size: int, rounds: int) -> dict:
    """Training tok/s of each kind from the cache, the kinds back to back and the rounds alternating their order (this
    CPU's speed drifts over minutes: each round compares kinds measured within a minute or two of each other)."""
    out: dict[str, list[float]] = {kind: [] for kind in kinds}
    for r in range(rounds):
        for kind in (kinds if r % 2 == 0 else kinds[::-1]):
            folder = work / f"speed-{r}-{kind}"
            if read_summary(folder) is None:
                shutil.rmtree(folder, ignore_errors=True)
                run_train(TrainConfig(activations=str(cache), out=str(folder), layers=str(layer), arch=kind, k=k,
                                      expansion=expansion, max_tokens=tokens, batch_size=batch_size))
            out[kind].append(read_summary(folder)["tokens_per_s"])
    return {kind: {"tok_s": v, "vs_topk": [a / b for a, b in zip(v, out.get("topk", v))]} for kind, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="bench/work/kinds")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--tokens", type=int, default=1_048_576)
    p.add_argument("--k", default="50")
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lm-loop-tokens", type=int, default=262_144)
    p.add_argument("--eval-tokens", type=int, default=32_768)
    p.add_argument("--arch", default="topk,batchtopk,jumprelu,matryoshka")
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--speed-tokens", type=int, default=262_144, help="tokens per kind per speed round (0: no rounds)")
    p.add_argument("--speed-rounds", type=int, default=2)
    p.add_argument("--json", required=True)
    a = p.parse_args()
    work = Path(a.work)
    report: dict = {"machine": {"cpu": _cpu(), "threads": torch.get_num_threads(), "torch": torch.__version__},
                    "layer": a.layer, "tokens": a.tokens, "k": a.k, "expansion": a.expansion, "batch_size": a.batch_size}

    cache = work / "cache"
    started = time.perf_counter()
    result = run_cache(CacheConfig(out=str(cache), layers=str(a.layer), max_tokens=a.tokens))
    info = read_cache_info(cache)
    timing = work / "cache-timing.json"  # the write speed of the run that wrote the cache (a resumed bench reads it)
    if result.tokens_written:
        timing.write_text(json.dumps({"seconds": time.perf_counter() - started, "tokens_written": result.tokens_written,
                                      "write_tok_s": result.tokens_written / max(result.seconds, 1e-9)}))
    report["cache"] = {**(json.loads(timing.read_text()) if timing.exists() else {}),
                       "tokens": info["tokens"], "model_dtype": info["model_dtype"], "outliers": info["outliers"],
                       "bytes": sum(f.stat().st_size for f in cache.rglob("*.safetensors"))}
    print("cache:", json.dumps(report["cache"]))
    report["lm_forward_tok_s"] = forward_speed(info["model_dtype"], a.layer, 65_536, 8, 256)
    print("LM forward:", report["lm_forward_tok_s"])

    loop = work / "lm-loop-topk"
    if read_summary(loop) is None:
        run_train(TrainConfig(out=str(loop), layers=str(a.layer), arch="topk", k=int(a.k.split(",")[0]),
                              expansion=a.expansion, max_tokens=a.lm_loop_tokens, batch_size=a.batch_size))
    report["lm_loop_train"] = {"tokens": read_summary(loop)["tokens"], "tok_s": read_summary(loop)["tokens_per_s"],
                               "model_dtype": read_summary(loop)["model_dtype"]}
    print("LM-loop training:", report["lm_loop_train"])

    if a.speed_tokens:
        report["speed_from_cache"] = speed_rounds(cache, work, a.arch.split(","), int(a.k.split(",")[0]), a.expansion,
                                                  a.layer, a.speed_tokens, a.batch_size, a.speed_rounds)
        print("training speed from the cache:", report["speed_from_cache"])

    sweep = run_sweep(SweepConfig(activations=str(cache), out=str(work / "sweep"), arch=a.arch, k=a.k,
                                  expansion=a.expansion, layers=str(a.layer), max_tokens=a.tokens, batch_size=a.batch_size,
                                  eval_tokens=a.eval_tokens, quality=not a.no_quality))
    print(sweep.text())
    report["sweep"] = sweep.rows
    report["train_log_tail"] = {r["arch"]: _last_log(work / "sweep" / r["run"]) for r in sweep.rows}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    print("written", a.json)


def _last_log(run: Path) -> dict:
    lines = RunDir(run).train_log.read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), platform.processor())
    except OSError:
        return platform.processor()


if __name__ == "__main__":
    main()
