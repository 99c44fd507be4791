"""saescope's CPU kernels (cpu_kernels.cpp), compiled once per machine, with their pure-torch twins.

The per-row passes of a training step that torch runs as several sweeps over a large matrix (bias + top-k over
the (tokens x d_sae) pre-activations, float32 or bf16; the decoder-gradient projection; the decoder-row
normalisation; the fp32 re-ranking of the bf16 screen), and the sparse gathers of the decoder and of both weight
gradients (each pair of a code reads one random row of a table: prefetched, and read as bf16 where the step computes in
bf16). Each function here takes the kernel when it is built and applies (contiguous CPU tensors; top-k also needs
AVX-512, which its fast path is written for) and the torch twin otherwise, so CUDA and machines without a C++ compiler
run unchanged. The first use compiles the file with torch.utils.cpp_extension into saescope's cache (about 15 s on 2
cores); SAESCOPE_CPU_KERNELS=0 turns the kernels off.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from saescope.core.cache import cache_dir
from saescope.core.system import cpu_flags  # the build is -march=native: a cache shared by other CPUs must not reuse it

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_loaded: dict[str, object] = {}


def kernels():
    """torch.ops.saescope_cpu, built for this machine on first use; None when off or not buildable."""
    if "ops" in _loaded:
        return _loaded["ops"]
    _loaded["ops"] = None
    if os.environ.get("SAESCOPE_CPU_KERNELS", "1") == "0":
        _loaded["why_not"] = "turned off by SAESCOPE_CPU_KERNELS=0"
        return None
    try:
        from torch.utils import cpp_extension

        key = hashlib.sha256(SOURCE.read_bytes() + cpu_flags().encode() + torch.__version__.encode()).hexdigest()[:12]
        name = f"saescope_cpu_{key}"
        build = cache_dir() / "kernels" / name
        build.mkdir(parents=True, exist_ok=True)
        # One builder at a time (torchrun ranks start together). torch's own lock is a file that a killed build
        # leaves behind, after which every later load waits forever; an flock dies with its process, and
        # whoever holds it knows that a leftover torch lock is stale.
        with open(build / "saescope.lock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            (build / "lock").unlink(missing_ok=True)
            if not (build / f"{name}.so").exists():
                print("saescope: compiling the CPU kernels for this machine (once, ~15 s)", file=sys.stderr, flush=True)
            cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=str(build), is_python_module=False,
                               extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
        _loaded["ops"] = torch.ops.saescope_cpu
        _loaded["avx512"] = bool(torch.ops.saescope_cpu.has_avx512())
    except Exception as exc:  # no compiler, no ninja, a read-only cache: the torch twins do the same maths
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
        _loaded["why_not"] = f"could not be built: {reason}"
        warnings.warn(f"saescope: CPU kernels not built ({reason}); using the slower pure-torch path", stacklevel=2)
    return _loaded["ops"]


def why_not_built() -> str:
    """Why `kernels()` is None (empty when they are built)."""
    return "" if kernels() is not None else str(_loaded.get("why_not", ""))


def _fits(*tensors: Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def fused_top_k_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a contiguous (n, d) matrix of this device and dtype (float32 or bf16) gets the fused top-k."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and kernels() is not None
            and bool(_loaded.get("avx512")))


def fused_top_k_applies(pre: Tensor, bias: Tensor | None = None) -> bool:
    """Whether `topk_with_bias` takes the kernel for this matrix and bias (else the caller's torch path).
    Not while autograd records: the kernel has no backward (the training encoder calls it in its forward)."""
    if bias is not None and not (bias.dtype in (torch.float32, pre.dtype) and bias.shape == pre.shape[-1:]
                                 and bias.device == pre.device):
        return False
    return (pre.dim() == 2 and pre.is_contiguous() and not (pre.requires_grad and torch.is_grad_enabled())
            and fused_top_k_available(pre.device, pre.dtype))


def topk_with_bias(pre: Tensor, bias: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest of each row of pre + bias and their columns, without writing pre + bias anywhere; the values in
    float32 (a bf16 pre is read as is, and its bias added in float32)."""
    return kernels().topk_bias(pre, bias.float().contiguous(), k)


def gathers(device: torch.device) -> bool:
    """Whether this device's sparse gathers run in saescope's kernels (which read float32 or bf16 tables alike)."""
    return device.type == "cpu" and kernels() is not None


def weighted_bags(table: Tensor, rows: Tensor, weights: Tensor, offsets: Tensor) -> Tensor:
    """out[b] = sum over p in [offsets[b], offsets[b + 1]) of weights[p] * table[rows[p]], (bags, d) float32. The table is
    read in its own dtype (bf16 halves the bytes of a gather that is bound by them) and summed in float32."""
    ops = kernels() if gathers(table.device) and table.dtype in (torch.float32, torch.bfloat16) else None
    if ops is not None:
        return ops.weighted_bags(table.contiguous(), rows.contiguous(), weights.float().contiguous(), offsets.contiguous())
    table = _widened(table)
    return F.embedding_bag(rows, table, offsets, mode="sum", per_sample_weights=weights.to(table.dtype), include_last_offset=True)


def _widened(table: Tensor) -> Tensor:
    """The twins' table: bf16 read as float32, as the kernels read it; float64 kept."""
    return table.float() if table.dtype in (torch.bfloat16, torch.float16) else table


def group_by_latent(indices: Tensor, d_sae: int) -> tuple[Tensor, Tensor]:
    """The pairs of a code (indices, flat) grouped by latent: their positions latent by latent (stable) and the
    (d_sae + 1,) offsets where each latent's start."""
    ops = kernels() if gathers(indices.device) else None
    if ops is not None:
        return ops.group_by_latent(indices.contiguous(), d_sae)
    order = torch.argsort(indices, stable=True)
    # index_add of integer ones, not bincount: bincount syncs with the host on CUDA to size its output.
    counts = torch.zeros(d_sae, dtype=torch.long, device=indices.device).index_add_(0, indices, torch.ones_like(indices))
    offsets = torch.zeros(d_sae + 1, dtype=torch.long, device=indices.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return order, offsets


def gathered_dots(x: Tensor, table: Tensor, idx: Tensor) -> Tensor:
    """out[r, s] = x[r] . table[idx[r, s]], (n, k) float32; the table read in its own dtype, as in weighted_bags."""
    ops = kernels() if gathers(table.device) and _fits(x) and table.dtype in (torch.float32, torch.bfloat16) else None
    if ops is not None:
        return ops.gathered_dots(x, table.contiguous(), idx.contiguous())
    n, k = idx.shape
    pairs = torch.arange(n * k, device=idx.device)
    table = _widened(table)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(  # torch's own gradient of a bag's weights
        x.to(table.dtype), table, idx.reshape(-1), pairs[::k], torch.div(pairs, k, rounding_mode="floor"), 0).view(n, k)


def project_out_row_norm_(grad: Tensor, w: Tensor) -> Tensor:
    """grad[i] -= (grad[i] . w[i]) w[i] in place: what is left cannot change the norm of unit rows w[i]."""
    ops = kernels() if _fits(grad, w) else None
    if ops is not None:
        ops.project_rows_(grad, w)
        torch.autograd.graph.increment_version(grad)  # as an in-place torch op would: autograd checks it
        return grad
    # vecdot + addcmul_: no d_sae x d_model temporaries beside vecdot's own
    parallel = torch.linalg.vecdot(grad, w)
    return grad.addcmul_(parallel[:, None], w, value=-1)


def normalize_rows_(w: Tensor) -> Tensor:
    """w[i] /= max(|w[i]|, eps) in place."""
    eps = torch.finfo(w.dtype).eps
    ops = kernels() if _fits(w) else None
    if ops is not None:
        ops.normalize_rows_(w, eps)
        torch.autograd.graph.increment_version(w)
        return w
    return w.div_(w.norm(dim=1, keepdim=True).clamp_min(eps))


def rerank_exact(x: Tensor, w: Tensor, bias: Tensor, cand: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest exact x[r] . w[c] + bias[c] over each row's candidates cand[r] (n, m), and their latents,
    in no particular order; a bias of -inf excludes its latent. The fp32 half of the bf16-screened encoder."""
    ops = kernels() if _fits(x, w, bias) and cand.dtype == torch.long and cand.is_contiguous() else None
    if ops is not None:
        return ops.rerank_exact(x, w, bias, cand, k)
    exact = torch.einsum("nd,nmd->nm", x, w[cand]) + bias[cand]
    exact = exact.masked_fill_(torch.isneginf(bias)[cand], float("-inf"))
    values, pick = exact.topk(k, dim=-1, sorted=False)
    return values, cand.gather(1, pick)
