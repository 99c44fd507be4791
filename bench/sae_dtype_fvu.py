"""FVU at equal tokens of the SAE step's dtypes: one layer trained from an activation cache with each --sae-dtype, then
every SAE encoded and decoded the same way (fp32) on held-out rows of another cache (norm outliers excluded, as the
trainer's filter does). What `sae_dtype auto` = bf16 on a CPU with fast bf16 is checked against.

    python bench/sae_dtype_fvu.py --train bench/work/toxicity/cache-comments-l15 \
        --held-out bench/work/toxicity/cache-default-l15 --layer 15 --tokens 1048576 --dtypes fp32,bf16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from saescope.core.activation_cache import open_activations
from saescope.core.activations import OutlierFilter
from saescope.core.io import load_saes
from saescope.core.train import TrainConfig, run_train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="the activation cache to train on")
    p.add_argument("--held-out", required=True, help="a cache of other text, for the FVU")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--tokens", type=int, default=1_048_576)
    p.add_argument("--held-out-tokens", type=int, default=65_536)
    p.add_argument("--preset", default="16x-k50")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    x = open_activations(a.held_out).rows(a.layer, torch.arange(a.held_out_tokens)).float()
    x = x[OutlierFilter(5.0).keep(x)]  # the trainer's filter, on one batch: 5 x its median norm
    out: dict = {"train": a.train, "held_out": a.held_out, "layer": a.layer, "tokens": a.tokens, "preset": a.preset,
                 "held_out_tokens": len(x), "runs": {}}
    for dtype in a.dtypes.split(","):
        run = Path(tempfile.mkdtemp(prefix=f"sae-dtype-{dtype}-"))
        start = time.perf_counter()
        run_train(TrainConfig(activations=a.train, layers=str(a.layer), preset=a.preset, max_tokens=a.tokens, out=str(run),
                              sae_dtype=dtype, checkpoint_every=10**6))
        wall = time.perf_counter() - start
        sae = load_saes(run)[a.layer]
        sae.compute_dtype = torch.float32
        with torch.no_grad():
            fvu = float((sae.reconstruct(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        out["runs"][dtype] = {"fvu_held_out": fvu, "train_wall_s": wall}
        print(f"sae_dtype {dtype}: held-out FVU {fvu:.5f}, trained in {wall:.1f} s", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
        print(f"written {a.json}")


if __name__ == "__main__":
    main()
