"""CPU microbenchmarks behind the trainer's choices (one SAE layer, 576 x 9216, k 50, 1024 tokens, 2 threads):
Adam step foreach vs fused, encoder matmul fp32 vs bf16 and into a fresh vs a reused buffer, top-k direct vs
chunked vs fused in row blocks vs saescope's group-maxima top_k vs the fused bias + top-k kernel (widths
4x/16x/64x), the decoder backward (torch's embedding_bag backward vs saescope's grouped sum), and the
decoder-norm constraint (torch vs saescope's row kernels).

    python bench/micro.py
"""

from __future__ import annotations

import time
from unittest.mock import patch

import torch
import torch.nn.functional as F

from saescope.core.sae.cpu_kernels import fused_top_k_applies, kernels, normalize_rows_, project_out_row_norm_
from saescope.core.sae.fast import Workspace, sparse_decode, top_k

D_MODEL, D_SAE, K, TOKENS = 576, 9216, 50, 1024


def timed(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def adam(**kw) -> float:
    params = [torch.nn.Parameter(torch.randn(D_SAE, D_MODEL)), torch.nn.Parameter(torch.randn(D_SAE, D_MODEL)),
              torch.nn.Parameter(torch.randn(D_SAE)), torch.nn.Parameter(torch.randn(D_MODEL))]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(params, lr=1e-4, **kw)
    return timed(opt.step)


def main() -> None:
    torch.set_num_threads(2)
    for kw in ({}, {"foreach": False}, {"fused": True}):
        print(f"Adam step {kw or 'default (foreach)'}: {adam(**kw):.1f} ms")
    x, W, b = torch.randn(TOKENS, D_MODEL), torch.randn(D_SAE, D_MODEL) / D_MODEL**0.5, torch.zeros(D_SAE)
    for dtype in (torch.float32, torch.bfloat16):
        xx, WW, bb = x.to(dtype), W.to(dtype), b.to(dtype)
        pre = F.linear(xx, WW, bb)
        print(f"{dtype}: encoder matmul {timed(lambda: F.linear(xx, WW, bb)):.1f} ms, "
              f"top-k {timed(lambda: pre.topk(K, dim=-1, sorted=False)):.1f} ms")
    pre = F.linear(x, W, b)
    for chunks in (2, 4, 8, 16, 32):
        def chunked(c=chunks):
            v, i = pre.view(TOKENS, c, -1).topk(K, dim=-1, sorted=False)
            v2, j = v.reshape(TOKENS, -1).topk(K, dim=-1, sorted=False)
            return v2, (i + torch.arange(c).view(1, c, 1) * (D_SAE // c)).reshape(TOKENS, -1).gather(1, j)
        print(f"top-k in {chunks} chunks: {timed(chunked):.1f} ms")
    print(f"matmul + top-k, whole batch: {timed(lambda: F.linear(x, W, b).topk(K, dim=-1, sorted=False)):.1f} ms")
    for rows in (64, 128, 256, 512):
        def blocked(r=rows):
            parts = [F.linear(x[s : s + r], W, b).topk(K, dim=-1, sorted=False) for s in range(0, TOKENS, r)]
            return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])
        print(f"matmul + top-k in blocks of {rows} rows: {timed(blocked):.1f} ms")
    ws = Workspace()
    reused = ws.pre_activations(TOKENS, D_SAE, torch.float32, x.device)
    print(f"encoder matmul into a fresh tensor {timed(lambda: F.linear(x, W, b)):.1f} ms, "
          f"into the reused workspace {timed(lambda: torch.addmm(b, x, W.T, out=reused)):.1f} ms")
    for d_sae in (4 * D_MODEL, D_SAE, 64 * D_MODEL):
        p = F.linear(x, torch.randn(d_sae, D_MODEL) / D_MODEL**0.5)
        bias = torch.randn(d_sae) * 0.1
        with patch("saescope.core.sae.fast.fused_top_k_applies", return_value=False):  # the torch path
            groups = timed(lambda p=p, b=bias: top_k(p, K, bias=b))
        line = (f"d_sae {d_sae}: torch.topk {timed(lambda p=p: p.topk(K, dim=-1, sorted=False)):.1f} ms, "
                f"bias pass + group maxima {groups:.1f} ms")
        if fused_top_k_applies(p):
            line += f", fused bias + top-k kernel {timed(lambda p=p, b=bias: top_k(p, K, bias=b)):.1f} ms"
        print(line)
    # the decoder-norm constraint: projection of the gradient and renormalisation, kernels vs torch twins
    grad, rows = torch.randn(D_SAE, D_MODEL), F.normalize(torch.randn(D_SAE, D_MODEL), dim=1)

    def twin_project():
        grad.addcmul_(torch.linalg.vecdot(grad, rows)[:, None], rows, value=-1)

    line = (f"decoder-gradient projection: vecdot + addcmul {timed(twin_project):.1f} ms; "
            f"row normalisation: norm + div {timed(lambda: rows.div_(rows.norm(dim=1, keepdim=True).clamp_min(1e-7))):.1f} ms")
    if kernels() is not None:
        line += (f"; kernels: {timed(lambda: project_out_row_norm_(grad, rows)):.1f} ms and "
                 f"{timed(lambda: normalize_rows_(rows)):.1f} ms")
    print(line)
    values, idx = top_k(pre, K)
    values = values.relu().requires_grad_()
    W_dec = torch.nn.Parameter(W.clone())
    grad_out = torch.randn(TOKENS, D_MODEL)

    def backward(decode):
        values.grad = W_dec.grad = None
        decode().backward(grad_out)

    torch_bag = lambda: F.embedding_bag(idx, W_dec, mode="sum", per_sample_weights=values)  # noqa: E731
    print(f"decoder forward + backward: torch embedding_bag {timed(lambda: backward(torch_bag)):.1f} ms, "
          f"saescope sparse_decode {timed(lambda: backward(lambda: sparse_decode(idx, values, W_dec))):.1f} ms")


if __name__ == "__main__":
    main()
