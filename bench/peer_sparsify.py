"""Train EleutherAI sparsify SAEs on the same tokens as saescope; run by bench/throughput.py in the peers' venv.

sparsify is a benchmark peer, never a dependency: this script runs under a separate interpreter
(`--peer-python`) where `eai-sparsify` is installed, and only talks to the benchmark through files.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--tokens", required=True, help="torch file with a (n_chunks, ctx_len) LongTensor")
    p.add_argument("--layers", required=True, help="comma list")
    p.add_argument("--expansion", type=int, required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--auxk-alpha", type=float, default=1 / 32)
    p.add_argument("--model-dtype", default="fp32")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from datasets import Dataset
    from sparsify import SaeConfig, TrainConfig, Trainer
    from transformers import AutoModelForCausalLM

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.model_dtype]
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=dtype).to(a.device)
    tokens = torch.load(a.tokens, weights_only=True)
    ds = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
    layers = [int(x) for x in a.layers.split(",")]
    cfg = TrainConfig(SaeConfig(expansion_factor=a.expansion, k=a.k), batch_size=a.batch_size, layers=layers,
                      optimizer=a.optimizer, auxk_alpha=a.auxk_alpha, lr_warmup_steps=0, log_to_wandb=False,
                      save_dir=a.out, run_name="sparsify", save_every=10**9)
    trainer = Trainer(cfg, ds, model)
    step_times: list[float] = []
    original_step = None
    # Time every training step through the optimizer's step, which runs once per batch.
    for opt in trainer.optimizers:
        original_step = opt.step

        def timed(*args, _orig=original_step, **kw):
            out = _orig(*args, **kw)
            step_times.append(time.perf_counter())
            return out

        opt.step = timed
    start = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - start
    # VmHWM, not ru_maxrss: Linux carries the parent's ru_maxrss over exec into this process.
    rss_mb = next(int(ln.split()[1]) / 1024 for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    Path(a.out, "timing.json").write_text(json.dumps({"wall_s": wall, "step_end_times": [t - start for t in step_times],
                                                      "peak_rss_mb": rss_mb, "peak_gpu_mb": gpu_mb,
                                                      "tokens": int(tokens.numel())}))


if __name__ == "__main__":
    main()
