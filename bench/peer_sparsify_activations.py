"""Train one EleutherAI sparsify top-k SAE on a .npy of activations (the file saescope's `train --activations` reads);
run by bench/ground_truth.py in the peers' venv.

sparsify trains only from a model's hooks (its Trainer takes a model and a token dataset), so the activations are
served by a stand-in model: "token" i is row i of the file, its embedding is that row, and its one layer is the
identity, so the hook on layers.0 sees exactly the stored rows. Rows come in a seeded order, one pass after another,
as many as saescope trains on, in steps of --batch rows (sequences of 256 "tokens"). sparsify's own defaults
otherwise (--optimizer signum, its learning rate for the width), or Adam at saescope's learning rate (--lr). The SAE
is saved in sparsify's format (saescope's load_saes reads it) with timing.json.

sparsify is a benchmark peer, never a dependency: this script runs under a separate interpreter.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

SEQ = 256


class RowsAsModel(nn.Module):
    """What sparsify's Trainer reads of a model, with the stored rows as its one layer's outputs."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.embed_tokens = nn.Embedding.from_pretrained(rows, freeze=True)
        self.layers = nn.ModuleList([nn.Identity()])
        self.config = SimpleNamespace(num_hidden_layers=1)
        self.dummy_inputs = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def forward(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h)
        return SimpleNamespace(last_hidden_state=h)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--activations", required=True)
    p.add_argument("--expansion", type=int, required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--batch", type=int, default=1024, help="rows per step (a multiple of 256)")
    p.add_argument("--optimizer", default="signum", choices=["signum", "adam"])
    p.add_argument("--lr", type=float, default=None, help="default: sparsify's for the width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    rows = torch.from_numpy(np.load(a.activations, mmap_mode="r")[:]).float()
    n = len(rows)
    steps = a.tokens // a.batch
    g = torch.Generator().manual_seed(a.seed)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-steps * a.batch // n))])[: steps * a.batch]

    from datasets import Dataset
    from sparsify import SaeConfig, TrainConfig, Trainer

    ds = Dataset.from_dict({"input_ids": order.reshape(-1, SEQ).tolist()}).with_format("torch")
    out = Path(a.out)
    cfg = TrainConfig(SaeConfig(expansion_factor=a.expansion, k=a.k), batch_size=a.batch // SEQ, layers=[0],
                      optimizer=a.optimizer, lr=a.lr, lr_warmup_steps=0, log_to_wandb=False, save_dir=str(out),
                      run_name="sparsify", save_every=10**9)
    trainer = Trainer(cfg, ds, RowsAsModel(rows))
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    saved = out / "sparsify"
    for extra in ("state.pt", "lr_scheduler_0.pt", "optimizer_0.pt", "rank_0_state.pt", "config.json"):
        (saved / extra).unlink(missing_ok=True)
    shutil.rmtree(out / "best", ignore_errors=True)
    (out / "timing.json").write_text(json.dumps({"arch": "topk", "tokens": steps * a.batch, "seconds": seconds,
                                                 "tok_s": steps * a.batch / seconds, "lr": a.lr,
                                                 "optimizer": a.optimizer, "batch": a.batch}))


if __name__ == "__main__":
    main()
