"""The two pieces of the trust checks that are not CLI commands: the fine-tuned checkpoint that
`saescope transfer` is measured on, and the time and memory of feature matching at scale. The rest of
the trust figures in RESULTS.md come from the CLI commands quoted there.

    python bench/trust.py finetune --out runs/smollm2-ft-math       # make the fine-tuned checkpoint
    python bench/trust.py match --sae A --sae B [--layer 15]        # time + peak memory of feature matching
    python bench/trust.py match --random 16384                      # the same on two random 16K x 576 decoders

finetune: a short full fine-tune of SmolLM2-135M-Instruct on MATH problems and solutions (TRL's SFTTrainer)
(../shared/data/benchmarks/math.jsonl), the "after" half of a real before/after pair for
`saescope transfer`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SAESCOPE_SHARED_DATA", ROOT.parent / "shared" / "data"))


def finetune_main(a: argparse.Namespace) -> None:
    from saescope.api.finetune import fine_tune
    from saescope.core.data.rows import iter_rows
    from saescope.core.models import load_model

    rows = [r for _, r in iter_rows(SHARED / "benchmarks" / "math.jsonl")]
    texts = [f"Problem: {r['context']}\nSolution: {r['chain_of_thought']}\nAnswer: {r['answer']}" for r in rows]
    lm = load_model(a.model, dtype="fp32")
    t0 = time.perf_counter()
    losses = fine_tune(lm, texts, steps=a.steps, lr=a.lr, max_length=a.ctx_len, batch_size=a.batch_size)
    took = time.perf_counter() - t0
    out = Path(a.out)
    lm.model.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    info = {"base": a.model, "data": "MATH problems+solutions (shared/data/benchmarks/math.jsonl)", "steps": a.steps,
            "lr": a.lr, "tokens_per_step": a.ctx_len * a.batch_size, "loss_first5": losses[:5], "loss_last5": losses[-5:],
            "seconds": round(took, 1), "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    (out / "finetune.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))


def match_main(a: argparse.Namespace) -> None:
    from saescope.apps.trust import decoder_match
    from saescope.apps.trust.stability import shares

    if a.random:
        g = torch.Generator().manual_seed(0)
        W_a, W_b = torch.randn(a.random, a.d_model, generator=g), torch.randn(a.random, a.d_model, generator=g)
        label = f"random {a.random} x {a.d_model}"
    else:
        from saescope.core.io import load_saes

        A = load_saes(a.sae[0], layers=[a.layer])[a.layer]
        B = load_saes(a.sae[1], layers=[a.layer])[a.layer]
        W_a, W_b, label = A.W_dec.detach(), B.W_dec.detach(), f"{a.sae[0]} vs {a.sae[1]} layer {a.layer}"
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    m = decoder_match(W_a, W_b)
    took = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"what": label, "n_a": W_a.shape[0], "n_b": W_b.shape[0], "d_model": W_a.shape[1], "seconds": round(took, 2),
           "peak_rss_mib": round(rss1 / 1024, 1), "rss_growth_mib": round((rss1 - rss0) / 1024, 1),
           "dense_fp64_matrix_would_be_mib": round(W_a.shape[0] * W_b.shape[0] * 8 / 2**20),
           "one_to_one": shares(m.assigned_cos), "max_cos_a_to_b": shares(m.best_ab), "threads": torch.get_num_threads()}
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("finetune")
    f.add_argument("--model", default="smollm2-135m-instruct")
    f.add_argument("--out", required=True)
    f.add_argument("--steps", type=int, default=60)
    f.add_argument("--lr", type=float, default=5e-5)
    f.add_argument("--ctx-len", type=int, default=128)
    f.add_argument("--batch-size", type=int, default=4)
    m = sub.add_parser("match")
    m.add_argument("--sae", action="append", default=[])
    m.add_argument("--layer", type=int, default=15)
    m.add_argument("--random", type=int, help="match two random decoders of this many rows instead")
    m.add_argument("--d-model", type=int, default=576)
    m.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("SAESCOPE_THREADS", torch.get_num_threads())))
    {"finetune": finetune_main, "match": match_main}[a.cmd](a)


if __name__ == "__main__":
    main()
