"""What the peer scripts share: their arguments, the model load and the timing file they hand back.

Imported by bench/peer_sparsify.py and bench/peer_saelens.py inside the peers' venv (the script's own
folder is on sys.path there); it imports nothing of saescope, so the peers' venv needs no saescope.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def peer_arguments(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--tokens", required=True, help="torch file with a (n_chunks, ctx_len) LongTensor")
    p.add_argument("--expansion", type=int, required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True, help="sequences per step")
    p.add_argument("--model-dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    return p


def load_peer_model(a: argparse.Namespace):
    """(model, tokens) after setting the thread count, as the benchmark asked."""
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.model_dtype]
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=dtype).to(a.device).eval()
    return model, torch.load(a.tokens, weights_only=True)


def write_timing(out: str, step_end_times: list[float], **extra) -> None:
    """timing.json: step end times (s from the start), peak RSS and peak GPU memory."""
    # VmHWM, not ru_maxrss: Linux carries the parent's ru_maxrss over exec into this process.
    status = Path("/proc/self/status").read_text().splitlines()
    rss_mb = next(int(ln.split()[1]) / 1024 for ln in status if ln.startswith("VmHWM:"))
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    Path(out, "timing.json").write_text(json.dumps({"step_end_times": step_end_times, "peak_rss_mb": rss_mb,
                                                    "peak_gpu_mb": gpu_mb, **extra}))
