"""Train one sae-lens SAE (topk, batchtopk, jumprelu or matryoshka) on a .npy of activations, the same file saescope's
`train --activations` reads; run by bench/ground_truth.py in the peers' venv.

sae-lens is a benchmark peer, never a dependency: this script runs under a separate interpreter and only talks to the
benchmark through files. Its own SAETrainer is fed batches of rows in a seeded order, one pass after another, as many
tokens as saescope trains on; the SAE is saved in sae-lens's format (saescope's load_saes reads it) with timing.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def read_activations(path: Path) -> torch.Tensor:
    """A .npy of rows, or one layer folder of a saescope activation cache (shard-*.safetensors, tensor "activations")."""
    if path.is_dir():
        from safetensors.torch import load_file
        shards = sorted(path.glob("shard-*.safetensors"))
        if not shards:
            raise SystemExit(f"{path}: no shard-*.safetensors")
        return torch.cat([load_file(f)["activations"].float() for f in shards])
    return torch.from_numpy(np.load(path, mmap_mode="r")[:]).float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--activations", required=True)
    p.add_argument("--arch", choices=["topk", "batchtopk", "jumprelu", "matryoshka"], required=True)
    p.add_argument("--expansion", type=int, required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--hook-name", default="", help="recorded in cfg.json, so saescope's loader knows the layer")
    p.add_argument("--model-name", default="")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    x = read_activations(Path(a.activations))
    n, d = x.shape
    d_sae = a.expansion * d

    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    if a.arch == "topk":
        from sae_lens.saes.topk_sae import TopKTrainingSAE as Sae
        from sae_lens.saes.topk_sae import TopKTrainingSAEConfig as Cfg
        extra = {"k": a.k}
    elif a.arch == "batchtopk":
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE as Sae
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig as Cfg
        extra = {"k": a.k}
    elif a.arch == "matryoshka":
        from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAE as Sae
        from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAEConfig as Cfg
        extra = {"k": a.k, "matryoshka_widths": [d_sae // f for f in (16, 8, 4, 2)] + [d_sae]}
    else:
        from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE as Sae
        from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAEConfig as Cfg
        extra = {"target_l0": float(a.k)}
    sae = Sae(Cfg(d_in=d, d_sae=d_sae, dtype="float32", device="cpu", **extra))
    steps = a.tokens // a.batch
    g = torch.Generator().manual_seed(a.seed)

    def provider():
        order = torch.randperm(n, generator=g)
        at = 0
        for _ in range(steps):
            if at + a.batch > n:
                order, at = torch.randperm(n, generator=g), 0
            yield x[order[at: at + a.batch]]
            at += a.batch

    # saescope's schedule as near as sae-lens has it: constant, then a linear decay over the last 20% of the steps
    cfg = SAETrainerConfig(total_training_samples=steps * a.batch, train_batch_size_samples=a.batch, lr=a.lr,
                           lr_end=a.lr / 10, lr_decay_steps=steps // 5, device="cpu")
    trainer = SAETrainer(cfg, sae, provider())
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    if hasattr(sae, "fold_W_dec_norm"):
        sae.fold_W_dec_norm()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sae.save_inference_model(out / "saelens") if hasattr(sae, "save_inference_model") else sae.save_model(out / "saelens")
    if a.hook_name or a.model_name:
        cfg_file = out / "saelens" / "cfg.json"
        saved = json.loads(cfg_file.read_text())
        saved.setdefault("metadata", {}).update({"hook_name": a.hook_name, "model_name": a.model_name})
        cfg_file.write_text(json.dumps(saved, indent=1))
    (out / "timing.json").write_text(json.dumps({"arch": a.arch, "tokens": steps * a.batch, "seconds": seconds,
                                                 "tok_s": steps * a.batch / seconds, "lr": a.lr, "batch": a.batch}))


if __name__ == "__main__":
    main()
