"""A plain top-k SAE in a few lines of torch, trained on the ground-truth generator: the reference saescope's trainer
is held against (issue 34), and the one-change-at-a-time variants that found what the trainer did differently.

    python bench/plain_sae.py --latents 1024 --lr 1e-3 --batch 1024 --passes 3                 # 0.755 recovered
    python bench/plain_sae.py --latents 1024 --lr 1e-3 --batch 1024 --passes 3 --variant nosub  # 0.699
    python bench/plain_sae.py --latents 2048 --batch 4096 --variant batch --simple              # BatchTopK, iid set

Variants (comma-separated): fvu (the loss divided by the batch's variance, as saescope's), proj (the decoder gradient's
radial part removed, as saescope's), nosub (the encoder reads x, not x - b_dec), detach (x - b_dec with no gradient
through the subtraction), batch (BatchTopK: the batch's k x B largest pre-activations). --simple: the iid generator
(no correlated or parent/child pairs, every feature equally likely).
"""

from __future__ import annotations

import argparse
import time

import torch

from saescope.core.data.synthetic import SyntheticConfig, SyntheticFeatures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latents", type=int, default=1024)
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--passes", type=float, default=3.0)
    p.add_argument("--variant", default="")
    p.add_argument("--simple", action="store_true")
    a = p.parse_args()
    variant = set(filter(None, a.variant.split(",")))
    torch.manual_seed(0)
    cfg = SyntheticConfig(correlated_pairs=0, hierarchical_pairs=0, alpha=0.0) if a.simple else SyntheticConfig()
    features = SyntheticFeatures(cfg)
    x = features.sample(500_000, torch.Generator().manual_seed(1))[0].float()
    held_out = features.sample(20_000, torch.Generator().manual_seed(2))[0].float()
    n, k = a.latents, a.k
    W_dec = torch.nn.functional.normalize(torch.randn(n, cfg.d), dim=1).requires_grad_()
    W_enc = W_dec.detach().T.clone().requires_grad_()
    b_enc = torch.zeros(n, requires_grad=True)
    b_dec = x[:10_000].mean(0).clone().requires_grad_()
    opt = torch.optim.Adam([W_dec, W_enc, b_enc, b_dec], lr=a.lr)
    if "nosub" in variant:  # the same pre-activations at step 0, the bias then learned on its own
        with torch.no_grad():
            b_enc -= b_dec @ W_enc

    def forward(xb: torch.Tensor) -> torch.Tensor:
        if "nosub" in variant:
            pre = xb @ W_enc + b_enc
        else:
            pre = (xb - (b_dec.detach() if "detach" in variant else b_dec)) @ W_enc + b_enc
        if "batch" in variant:
            flat = pre.flatten()
            values, idx = flat.topk(k * pre.shape[0])
            z = torch.zeros_like(flat).scatter(0, idx, values.relu()).view_as(pre)
        else:
            values, idx = pre.topk(k, dim=1)
            z = torch.zeros_like(pre).scatter(1, idx, values.relu())
        return z @ W_dec + b_dec

    start = time.time()
    for step in range(int(a.passes * len(x) / a.batch)):
        at = (step * a.batch) % len(x)
        xb = x[at:at + a.batch]
        err = (forward(xb) - xb).pow(2)
        loss = err.sum() / (xb - xb.mean(0)).pow(2).sum() if "fvu" in variant else err.sum(1).mean()
        opt.zero_grad()
        loss.backward()
        if "proj" in variant:
            with torch.no_grad():
                W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
    with torch.no_grad():
        fvu = float((forward(held_out) - held_out).pow(2).sum() / (held_out - held_out.mean(0)).pow(2).sum())
        best = (features.directions.float() @ W_dec.T).max(1).values
    print(f"{','.join(sorted(variant)) or 'plain'} latents {n} lr {a.lr} batch {a.batch} passes {a.passes}: recovered "
          f"{float((best > 0.9).float().mean()):.3f}, mean best cos {float(best.mean()):.3f}, FVU {fvu:.3f} "
          f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
