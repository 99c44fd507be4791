"""The fast path (sae/fast.py) against the plain reference of sae/topk.py: same codes, losses and gradients."""

from contextlib import ExitStack, nullcontext
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from saescope.core.sae import SAEConfig, TopKSAE, Workspace, latent_weighted_sum
from saescope.core.sae.cpu_kernels import kernels
from saescope.core.sae.fast import LatentGroups, fused_topk_encode, top_k
from saescope.core.sae.topk import reference_encode

# (dtype, kernel): float32 on CPU takes the fused top-k kernel when it is built; kernel=False turns it off, so the
# blockwise torch top-k (d_sae 1024: two levels of group maxima) and the bias added by the matmul run instead.
PATHS = [(torch.float64, False), (torch.float32, True), (torch.float32, False)]


def _torch_top_k_only(kernel: bool):
    if kernel:
        return nullcontext()
    stack = ExitStack()
    stack.enter_context(patch("saescope.core.sae.fast.fused_top_k_available", return_value=False))
    stack.enter_context(patch("saescope.core.sae.fast.fused_top_k_applies", return_value=False))
    return stack


def _sae(d_sae: int, dtype: torch.dtype, d_model: int = 16, k: int = 4) -> TopKSAE:
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_model, d_sae, k), dtype=dtype)
    sae.init_tied(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
        sae.b_dec.normal_()
        sae.b_enc.sub_(4)
    return sae


def _tokens(n: int, dtype: torch.dtype, g: torch.Generator, d_model: int = 16) -> torch.Tensor:
    """Large random tokens, and 8 zero ones: with b_enc lowered by 4 (`_sae`) these have no positive
    pre-activation, so the code holds values on both sides of the ReLU."""
    x = 4 * torch.randn(n, d_model, dtype=dtype, generator=g)
    x[:8] = 0
    return x


def _by_latent(indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (latent, value) pairs in latent order: the top-k paths return them in no particular order."""
    order = indices.argsort(-1)
    return indices.gather(-1, order), values.gather(-1, order)


def _tol(dtype: torch.dtype) -> dict:
    return {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-4}


@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("d_sae", [64, 1024])
@pytest.mark.parametrize(("dtype", "kernel"), PATHS)
def test_fused_encode_equals_reference_encode(dtype, kernel, d_sae, with_dead):
    """Values, indices and the AuxK selection, and the gradients of x, W_enc and b_enc through both codes."""
    if kernel and kernels() is None:
        pytest.skip("saescope's CPU kernels are not built here")
    sae = _sae(d_sae, dtype)
    g = torch.Generator().manual_seed(1)
    x = _tokens(32, dtype, g)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[torch.randperm(d_sae, generator=g)[:20]] = True
    k_aux = 8 if with_dead else 0
    r, r_aux = torch.randn(32, sae.k, dtype=dtype, generator=g), torch.randn(32, k_aux, dtype=dtype, generator=g)
    args = (sae.W_enc, sae.b_enc)

    xf = x.clone().requires_grad_()
    with _torch_top_k_only(kernel):
        fast = fused_topk_encode(xf, *args, k=sae.k, compute_dtype=dtype, dead=dead if with_dead else None, k_aux=k_aux,
                                 workspace=Workspace(), with_groups=True)
    assert fast.groups is not None and fast.aux_indices.shape == (32, k_aux)
    loss = (_by_latent(fast.indices, fast.values)[1] * r).sum() + (_by_latent(fast.aux_indices, fast.aux_values)[1] * r_aux).sum()
    loss.backward()
    got = [xf.grad, sae.W_enc.grad, sae.b_enc.grad]
    sae.zero_grad()

    xr = x.clone().requires_grad_()
    code, aux = reference_encode(xr, *args, sae.k, dead=dead if with_dead else None, k_aux=k_aux)
    assert (aux is not None) == with_dead
    loss = (_by_latent(code.indices, code.values)[1] * r).sum()
    if with_dead:
        loss = loss + (_by_latent(aux.indices, aux.values)[1] * r_aux).sum()
    loss.backward()
    want = [xr.grad, sae.W_enc.grad, sae.b_enc.grad]

    for (fi, fv), (ri, rv) in [(_by_latent(fast.indices, fast.values), _by_latent(code.indices, code.values))] + (
            [(_by_latent(fast.aux_indices, fast.aux_values), _by_latent(aux.indices, aux.values))] if with_dead else []):
        assert torch.equal(fi, ri)
        torch.testing.assert_close(fv, rv, **_tol(dtype))
    if with_dead:
        assert dead[fast.aux_indices].all() and (fast.aux_values == 0).any() and (fast.aux_values > 0).any()
    assert (fast.values == 0).any() and (fast.values > 0).any()
    for g_fast, g_ref in zip(got, want, strict=True):
        torch.testing.assert_close(g_fast, g_ref, **_tol(dtype))


@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("d_sae", [64, 1024])
@pytest.mark.parametrize(("dtype", "kernel"), PATHS)
def test_fast_forward_equals_reference_forward(dtype, kernel, d_sae, with_dead, centred):
    """TopKSAE with fused=True (the default) and fused=False: the code, x_hat, FVU, AuxK and the gradients of
    W_enc, b_enc, W_dec, b_dec and x, with token weights, for an encoder reading x or x - b_dec (whose gradient the fast
    path takes as one product); then encode/decode on (batch, seq, d_model)."""
    if kernel and kernels() is None:
        pytest.skip("saescope's CPU kernels are not built here")
    sae = _sae(d_sae, dtype)
    sae.centred = centred
    g = torch.Generator().manual_seed(2)
    x = _tokens(48, dtype, g)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[torch.randperm(d_sae, generator=g)[:20]] = True
    weights = (torch.rand(48, generator=g) > 0.2).to(dtype)
    runs = {}
    for fused in (True, False):
        sae.fused = fused
        xg = x.clone().requires_grad_()
        with _torch_top_k_only(kernel):
            out = sae(xg, dead if with_dead else None, weights=weights, workspace=Workspace() if fused else None)
            (out.fvu + out.auxk_fvu).backward()
            with torch.no_grad():
                code3 = sae.encode(x.reshape(3, 16, 16))
                x_hat3 = sae.decode(code3)
        runs[fused] = (out, [p.grad.clone() for p in sae.parameters()] + [xg.grad], code3, x_hat3)
        sae.zero_grad()
    (fast, fast_grads, fast3, fast_hat3), (ref, ref_grads, ref3, ref_hat3) = runs[True], runs[False]
    assert fast.code.groups is not None and ref.code.groups is None
    assert with_dead == (float(fast.auxk_fvu.detach()) > 0)
    for a, b in [(fast.code, ref.code), (fast3, ref3)]:
        (ai, av), (bi, bv) = _by_latent(a.indices, a.values), _by_latent(b.indices, b.values)
        assert torch.equal(ai, bi)
        torch.testing.assert_close(av, bv, **_tol(dtype))
    for a, b in [(fast.x_hat, ref.x_hat), (fast.fvu, ref.fvu), (fast.auxk_fvu, ref.auxk_fvu), (fast_hat3, ref_hat3)]:
        torch.testing.assert_close(a.detach(), b.detach(), **_tol(dtype))
    for name, a, b in zip(["W_enc", "b_enc", "W_dec", "b_dec", "x"], fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, **_tol(dtype), msg=lambda m, name=name: f"grad of {name}: {m}")


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 6), d_sae=st.integers(6, 50), seed=st.integers(0, 10_000))
def test_latent_sums_equal_dense(n, k, d_sae, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(d_sae, generator=g)[:k] for _ in range(n)])
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    rows = torch.randn(n, 5, generator=g, dtype=torch.float64)
    dense = torch.zeros(n, d_sae, dtype=torch.float64).scatter(1, idx, w)
    assert torch.allclose(latent_weighted_sum(idx, w, rows, d_sae), dense.T @ rows)
    assert torch.allclose(LatentGroups(idx, d_sae).sum(w), dense.sum(0))


@settings(max_examples=120, deadline=None)
@given(n=st.integers(1, 12), groups=st.integers(1, 40), block=st.sampled_from([2, 4, 8]), k=st.integers(1, 30),
       levels=st.integers(1, 4), seed=st.integers(0, 10_000), with_bias=st.booleans(), fused=st.booleans(),
       odd=st.integers(0, 37))
def test_top_k_selects_what_torch_topk_selects(n, groups, block, k, levels, seed, with_bias, fused, odd):
    """Same values as torch.topk, at columns holding them, no column twice; small integers make many ties,
    -inf entries (AuxK's masked live latents) must not matter and NaN ranks first, as in torch.topk. Both
    paths: the fused CPU kernel (when built; any width) and the group maxima (widths a multiple of block)."""
    if fused and kernels() is None:
        return  # the kernel's own test says why it is missing
    d = groups * block + (odd if fused else 0)
    k = min(k, d)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-levels, levels + 1, (n, d), generator=g).float()
    x[torch.rand(n, d, generator=g) < 0.2] = float("-inf")
    x[torch.rand(n, d, generator=g) < 0.03] = float("inf")
    x[torch.rand(n, d, generator=g) < 0.02] = float("nan")
    bias = torch.randint(-1, 2, (d,), generator=g).float() if with_bias else None
    if with_bias:
        bias[torch.rand(d, generator=g) < 0.1] = float("-inf")  # excluded columns (AuxK's live latents)
    with patch("saescope.core.sae.fast.fused_top_k_applies", return_value=False) if not fused else nullcontext():
        values, cols = top_k(x, k, bias=bias, block=block)
        batched_values, batched_cols = top_k(x.reshape(1, n, d), k, bias=bias, block=block)  # leading dimensions kept
    full = (x + bias).masked_fill(torch.isneginf(bias), float("-inf")) if with_bias else x
    want = full.topk(k, dim=-1).values
    torch.testing.assert_close(values.sort(-1, descending=True).values, want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(full.gather(1, cols), values, rtol=0, atol=0, equal_nan=True)
    assert all(len(set(row.tolist())) == k for row in cols)
    torch.testing.assert_close(batched_values[0], values, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(batched_cols[0], cols)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("with_dead", [False, True])
def test_screened_encode_equals_the_fp32_encode(kernel, with_dead):
    """The bf16 screen + fp32 ranking (what an fp32 encoder runs on CPUs with fast bf16): the same latents as the
    fp32 matmul, fp32 values, the same gradients; AuxK picks dead latents, with values within bf16 rounding of
    their exact pre-activations. Well-separated pre-activations here (the real-activation test is in
    tests/integration/test_smollm2.py); kernel=False runs the torch twins."""
    if kernel and kernels() is None:
        pytest.skip("saescope's CPU kernels are not built here")
    sae = _sae(1024, torch.float32, k=8)
    g = torch.Generator().manual_seed(3)
    x = _tokens(64, torch.float32, g)
    dead = torch.zeros(1024, dtype=torch.bool)
    dead[torch.randperm(1024, generator=g)[:40]] = True
    k_aux = 8 if with_dead else 0
    r = torch.randn(64, sae.k, generator=g)
    codes, grads = {}, {}
    for screen in (True, False):
        xg = x.clone().requires_grad_()
        with _torch_top_k_only(kernel), patch("saescope.core.sae.fast.screens", return_value=screen):
            got = fused_topk_encode(xg, sae.W_enc, sae.b_enc, k=sae.k, compute_dtype=torch.float32,
                                    dead=dead if with_dead else None, k_aux=k_aux, workspace=Workspace(), with_groups=True)
        (_by_latent(got.indices, got.values)[1] * r).sum().backward()
        codes[screen], grads[screen] = got, [xg.grad, sae.W_enc.grad, sae.b_enc.grad]
        sae.zero_grad()
    (si, sv), (fi, fv) = _by_latent(codes[True].indices, codes[True].values), _by_latent(codes[False].indices, codes[False].values)
    assert torch.equal(si, fi) and (fv > 0).any()
    torch.testing.assert_close(sv, fv, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if with_dead:
        aux_i, aux_v = codes[True].aux_indices, codes[True].aux_values
        assert aux_i.shape == (64, k_aux) and dead[aux_i].all()
        exact = (x @ sae.W_enc.T + sae.b_enc).gather(1, aux_i).clamp_min(0)
        torch.testing.assert_close(aux_v, exact, atol=0.05, rtol=2e-2)


def test_an_encoder_screens_only_in_fp32_on_a_cpu_where_bf16_is_fast(monkeypatch):
    from saescope.core.sae import fast

    monkeypatch.setattr(fast, "_SCREEN_PAYS", {})
    monkeypatch.setenv("SAESCOPE_CPU_DTYPE", "fp32")
    assert not fast.screens(torch.device("cpu"), torch.float32)  # measured or forced fp32: no screen
    monkeypatch.setenv("SAESCOPE_CPU_DTYPE", "bf16")  # a forced bf16 LM does not force the screen: the timing decides
    measured = fast.cpu_bf16_speedup() >= fast.BF16_MIN_SPEEDUP
    assert fast.screens(torch.device("cpu"), torch.float32) == (fast.fused_top_k_available(torch.device("cpu"), torch.float32)
                                                                 and measured)
    assert not fast.screens(torch.device("cpu"), torch.bfloat16)  # asked for bf16: the plain bf16 path
    assert not fast.screens(torch.device("meta"), torch.float32)


def test_a_bf16_step_is_the_fp32_step_within_bf16_rounding():
    """compute_dtype bf16 (on a CPU with the kernels: bf16 product, top-k over it, bf16 gathers, fp32 sums) against fp32:
    the same loss to bf16 precision and gradients pointing the same way."""
    if kernels() is None:
        pytest.skip("saescope's CPU kernels are not built here")
    sae = _sae(512, torch.float32, d_model=64, k=8)
    sae.centred = True
    x = _tokens(256, torch.float32, torch.Generator().manual_seed(3), d_model=64)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        sae.compute_dtype = dtype
        out = sae(x, workspace=Workspace())
        out.fvu.backward()
        runs[dtype] = (float(out.fvu.detach()), [p.grad.clone() for p in sae.parameters()])
        sae.zero_grad()
    (fvu32, grads32), (fvu16, grads16) = runs[torch.float32], runs[torch.bfloat16]
    assert fvu16 == pytest.approx(fvu32, rel=2e-2)
    for name, a, b in zip(["W_enc", "b_enc", "W_dec", "b_dec"], grads32, grads16, strict=True):
        assert a.dtype == b.dtype == torch.float32, name
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.98, name


def test_a_read_loop_converts_the_weights_once_per_version():
    """weight_as with reuse keeps the low-precision copy until the weight changes; without, it keeps nothing."""
    from saescope.core.sae.fast import weight_as

    w = torch.nn.Parameter(torch.randn(8, 4))
    first = weight_as(w, torch.bfloat16, reuse=True)
    assert weight_as(w, torch.bfloat16, reuse=True) is first and torch.equal(first, w.detach().bfloat16())
    with torch.no_grad():
        w.add_(1.0)  # an optimizer step: a new version
    again = weight_as(w, torch.bfloat16, reuse=True)
    assert again is not first and torch.equal(again, w.detach().bfloat16())
    assert weight_as(w, torch.bfloat16, reuse=False) is not again
    assert weight_as(w, torch.float32, reuse=True) is w
