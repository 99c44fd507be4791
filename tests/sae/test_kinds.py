"""The SAE kinds beside top-k (saescope.core.sae.kinds): each selection rule against its plain dense definition, the
losses against hand computations, and the training-time state (thresholds) as the papers define it."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saescope.core.sae import SAE_KINDS, TRAINABLE_KINDS, SAEConfig, is_control, make_sae, random_like
from saescope.core.sae.fast import batch_top_k, threshold_code
from saescope.core.sae.kinds import THRESHOLD_LR_SCALE, THRESHOLD_MOMENTUM, JumpReLUSAE, matryoshka_prefixes


def _sae(kind: str, d_model: int = 16, d_sae: int = 64, k: int = 4, seed: int = 0, **kw):
    sae = make_sae(SAEConfig(d_model, d_sae, k, kind=kind), **kw)
    sae.init_tied(torch.Generator().manual_seed(seed))
    return sae


def _dense(code, d_sae: int) -> torch.Tensor:
    return code.dense(d_sae)


def _x(n: int = 40, d: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


# ---------------------------------------------------------------- BatchTopK's selection
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), d=st.integers(1, 40), per=st.integers(1, 10), seed=st.integers(0, 10_000))
def test_batch_top_k_keeps_the_batch_s_largest_positive_entries(n, d, per, seed):
    pre = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    pre[0] *= 30  # one token far larger than the rest: it takes more than its share, the shortlist must grow
    total = min(per * n, n * d)
    values, cols = batch_top_k(pre, total)
    got = torch.zeros(n, d).scatter_(1, cols, values)
    flat = pre.reshape(-1)
    cut = flat.topk(total).values.min()
    want = torch.where((pre >= cut) & (pre > 0), pre, torch.zeros_like(pre))
    assert torch.equal(got, want)
    assert int((got > 0).sum()) <= total


@pytest.mark.parametrize("with_rows", [False, True])
def test_the_encoder_s_batch_selection_equals_the_plain_one_on_every_path(with_rows):
    """fused_topk_encode(per_batch=True) takes the bf16 screen where this CPU has it (tokens that may hold more than
    their shortlist get their whole fp32 row): the same latents and values as batch_top_k on the fp32 product."""
    from saescope.core.sae.fast import fused_topk_encode

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    x[3] *= 40  # far above the rest: it holds many times its share
    W, b = torch.randn(256, 32, generator=g) / 32**0.5, torch.randn(256, generator=g) * 0.1
    rows = torch.ones(64, dtype=torch.bool)
    if with_rows:
        rows[[5, 9]] = False
    enc = fused_topk_encode(x, W, b, k=4, compute_dtype=torch.float32, per_batch=True, rows=rows if with_rows else None)
    got = torch.zeros(64, 256).scatter_(1, enc.indices, enc.values)
    pre = (x @ W.T + b).masked_fill(~rows[:, None], float("-inf"))
    values, cols = batch_top_k(pre, 4 * int(rows.sum()))
    want = torch.zeros(64, 256).scatter_(1, cols, values)
    assert torch.equal(got > 0, want > 0)
    assert torch.allclose(got, want, atol=1e-5)
    assert int((got[3] > 0).sum()) > 8


def test_batch_top_k_with_masked_rows_spends_the_budget_on_the_others():
    pre = torch.tensor([[5.0, 4.0, 3.0], [1.0, 2.0, 0.5], [9.0, 8.0, 7.0]])
    pre[2] = float("-inf")  # a left-out token
    values, cols = batch_top_k(pre, 4)
    got = torch.zeros(3, 3).scatter_(1, cols, values)
    assert torch.equal(got, torch.tensor([[5.0, 4.0, 3.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]))


def test_threshold_code_is_relu_above_each_latent_s_threshold():
    pre = torch.tensor([[0.5, 2.0, -1.0, 0.2], [3.0, 0.0, 0.1, 0.3]])
    theta = torch.tensor([0.4, 2.5, 0.0, 0.25])
    values, cols = threshold_code(pre, theta)
    got = torch.zeros(2, 4).scatter_(1, cols, values)
    assert torch.equal(got, torch.tensor([[0.5, 0.0, 0.0, 0.0], [3.0, 0.0, 0.1, 0.3]]))
    assert cols.shape[1] == 3  # padded to the widest token


# ---------------------------------------------------------------- BatchTopK and Matryoshka SAEs
def test_batchtopk_training_code_is_k_per_token_on_average_and_inference_uses_the_threshold():
    sae, x = _sae("batchtopk"), _x()
    sae.init_b_dec(x)
    out = sae(x)
    active = out.code.values > 0
    assert int(active.sum()) == sae.k * x.shape[0]  # continuous values: no ties, exactly k x tokens
    assert active.sum(1).float().std() > 0  # but not k for every token
    # no threshold learned yet (a fresh SAE): inference keeps each token's k largest
    assert math.isnan(float(sae.threshold))
    assert torch.equal((sae.encode(x).values > 0).sum(1), torch.full((x.shape[0],), sae.k))
    sae.after_step(out.code, torch.ones(x.shape[0], dtype=torch.bool))
    first = float(out.code.values[active].min())
    assert float(sae.threshold) == pytest.approx(first)
    sae.after_step(out.code.__class__(out.code.indices, out.code.values * 2), torch.ones(x.shape[0], dtype=torch.bool))
    assert float(sae.threshold) == pytest.approx((1 - THRESHOLD_MOMENTUM) * first + THRESHOLD_MOMENTUM * 2 * first)
    pre = sae.pre_activations(x).detach()
    want = torch.where(pre > sae.threshold, pre, torch.zeros_like(pre)).clamp_min(0)
    assert torch.allclose(_dense(sae.encode(x), sae.d_sae), want, atol=1e-6)


@pytest.mark.parametrize("kind", ["batchtopk", "matryoshka", "jumprelu"])
def test_a_global_kind_in_its_per_token_warm_up_trains_on_each_token_s_k_largest(kind):
    sae, x = _sae(kind), _x()
    sae.init_b_dec(x)
    sae.init_from_batch(x)
    if kind != "jumprelu":
        sae.threshold.fill_(1.5)  # a running estimate from earlier batch-wide steps
    threshold = sae.threshold.detach().clone()
    sae.per_token = True
    out = sae(x)
    assert torch.equal((out.code.values > 0).sum(1), torch.full((x.shape[0],), sae.k))
    pre = sae.pre_activations(x).detach()
    want = torch.zeros_like(pre).scatter(1, pre.topk(sae.k, dim=1).indices, pre.topk(sae.k, dim=1).values).clamp_min(0)
    assert torch.allclose(_dense(out.code, sae.d_sae), want, atol=1e-5)
    assert out.extra is None or kind == "matryoshka"  # no L0 loss in the warm-up; Matryoshka's prefixes stay
    sae.after_step(out.code, torch.ones(x.shape[0], dtype=torch.bool))
    assert torch.equal(sae.threshold.detach(), threshold)  # no running estimate from a per-token code
    (out.fvu + (out.extra if out.extra is not None else 0)).backward()
    if kind == "jumprelu":  # the thresholds learn nothing from a code they did not choose
        assert sae.log_threshold.grad is None or not sae.log_threshold.grad.any()


def test_the_end_of_the_warm_up_restarts_the_kind_s_threshold():
    btk, x = _sae("batchtopk"), _x()
    btk.init_b_dec(x)
    btk.threshold.fill_(3.0)
    btk.end_warmup(x)
    assert math.isnan(float(btk.threshold))  # the running estimate starts again from the batch-wide selection
    jr = _sae("jumprelu")
    jr.init_b_dec(x)
    jr.log_threshold.data.fill_(5.0)
    jr.end_warmup(x)
    jr.per_token = False
    l0 = float((jr(x).code.values > 0).sum(1).float().mean())
    assert l0 == pytest.approx(jr.k, rel=0.2)  # at log-threshold 5 nothing fired; restarted, the batch's L0 is k again


def test_batchtopk_left_out_tokens_fire_nothing_and_do_not_take_the_budget():
    sae, x = _sae("batchtopk"), _x()
    sae.init_b_dec(x)
    w = torch.ones(x.shape[0])
    w[:5] = 0
    out = sae(x, weights=w)
    active = out.code.values > 0
    assert not active[:5].any()
    assert int(active.sum()) == sae.k * 35


def test_matryoshka_prefixes():
    assert matryoshka_prefixes(4608) == [288, 576, 1152, 2304, 4608]
    assert matryoshka_prefixes(64) == [4, 8, 16, 32, 64]
    assert matryoshka_prefixes(6) == [3, 6]
    assert matryoshka_prefixes(1) == [1]


def test_matryoshka_extra_loss_is_the_sum_of_the_prefix_reconstructions_fvu():
    sae, x = _sae("matryoshka"), _x()
    sae.init_b_dec(x)
    out = sae(x)
    z = _dense(out.code, sae.d_sae).detach()
    variance = (x - x.mean(0)).pow(2).sum()
    want = sum(((x - (z[:, :m] @ sae.W_dec[:m] + sae.b_dec)).pow(2).sum() / variance) for m in (4, 8, 16, 32))
    assert float(out.extra) == pytest.approx(float(want), rel=1e-5)
    full = ((x - (z @ sae.W_dec + sae.b_dec)).pow(2).sum() / variance)
    assert float(out.fvu) == pytest.approx(float(full), rel=1e-5)


@pytest.mark.parametrize("kind", ["batchtopk", "matryoshka"])
def test_batch_kinds_training_gradients_equal_the_dense_reference(kind):
    """The fused, ragged training path (sparse encode, compacted decode and backward) against the loss written densely:
    the batch's k x tokens largest pre-activations kept, every prefix's FVU summed for Matryoshka."""
    sae, x = _sae(kind, d_sae=64, k=4), _x(n=48)
    sae.init_b_dec(x)
    out = sae(x)
    (out.fvu + (out.extra if out.extra is not None else 0)).backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    pre = x @ sae.W_enc.T + sae.b_enc
    keep = torch.zeros_like(pre, dtype=torch.bool)
    keep.view(-1)[pre.detach().flatten().topk(4 * 48).indices] = True
    z = pre.clamp_min(0) * keep
    variance = (x - x.mean(0)).pow(2).sum()
    sizes = [64] if kind == "batchtopk" else [4, 8, 16, 32, 64]
    loss = sum(((x - (z[:, :m] @ sae.W_dec[:m] + sae.b_dec)).pow(2).sum() / variance) for m in sizes)
    loss.backward()
    assert float(out.fvu + (out.extra if out.extra is not None else 0)) == pytest.approx(float(loss), rel=1e-5)
    for name, p in sae.named_parameters():
        assert torch.allclose(got[name], p.grad, atol=1e-5, rtol=1e-4), name


# ---------------------------------------------------------------- JumpReLU
def test_jumprelu_encode_is_pre_times_step_and_its_threshold_starts_at_the_batch_s_k():
    sae, x = _sae("jumprelu"), _x(n=200)
    sae.init_b_dec(x)
    sae.init_from_batch(x)
    pre = sae.pre_activations(x).detach()
    z = _dense(sae.encode(x), sae.d_sae)
    assert torch.allclose(z, pre * (pre > sae.threshold.detach()), atol=1e-6)
    assert (z > 0).sum(1).float().mean() == pytest.approx(sae.k, abs=0.05)  # L0 = k on the first batch
    assert float(sae.bandwidth) > 0


def test_jumprelu_straight_through_gradients_match_the_rectangle_kernel_estimator():
    """d z / d theta = -(theta / eps) 1[|pre - theta| < eps / 2]; d L0 / d theta = -(1 / eps) 1[...]."""
    sae = _sae("jumprelu", d_model=2, d_sae=2, k=1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.b_enc.zero_()
        sae.log_threshold.copy_(torch.tensor([1.0, 1.0]).log())
        sae.bandwidth.fill_(0.2)
    x = torch.tensor([[1.05, 0.5], [0.95, 1.5]])  # latent 0 within eps/2 of theta on both tokens; latent 1 on neither
    code, _ = sae.train_code(x, None, 0, None)
    _dense(code, 2).sum().backward(retain_graph=True)
    grad_theta = sae.log_threshold.grad / sae.threshold.detach()  # d/d log theta = theta d/d theta
    assert grad_theta.tolist() == pytest.approx([-(1.0 / 0.2) * 2, 0.0])
    sae.log_threshold.grad = None
    sae._l0.sum().backward()
    assert (sae.log_threshold.grad / sae.threshold.detach()).tolist() == pytest.approx([-(1.0 / 0.2) * 2, 0.0])


class _DenseJumpReLU(torch.autograd.Function):
    """The estimator written densely over tokens x d_sae, as the paper states it: the reference for the sparse one."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta), (pre > theta).to(pre.dtype).sum(1)

    @staticmethod
    def backward(ctx, grad_z, grad_l0):
        pre, theta = ctx.saved_tensors
        kernel = ((pre - theta).abs() < ctx.eps / 2).to(pre.dtype)
        grad_theta = (kernel * (grad_z * (-theta / ctx.eps) + grad_l0[:, None] * (-1 / ctx.eps))).sum(0)
        return grad_z * (pre > theta), grad_theta, None


def test_jumprelu_sparse_gradients_equal_the_dense_estimator():
    sae, x = _sae("jumprelu", d_sae=96, k=6), _x(n=64)
    sae.init_b_dec(x)
    sae.init_from_batch(x)
    with torch.no_grad():
        sae.bandwidth.fill_(0.3)  # wide enough that many entries sit in the kernel
    keep = torch.ones(64, dtype=torch.bool)
    keep[7] = False
    target = torch.randn(64, 16, generator=torch.Generator().manual_seed(5))

    def loss_of(z, l0):
        x_hat = z @ sae.W_dec + sae.b_dec
        return ((x_hat - target) ** 2).sum() + 0.3 * l0.sum()

    code, _ = sae.train_code(x, None, 0, None, keep)
    loss_of(code.dense(96) * 1.0, sae._l0 * keep).backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    pre = torch.addmm(sae.b_enc, x, sae.W_enc.T)
    z, l0 = _DenseJumpReLU.apply(pre, sae.threshold, float(sae.bandwidth))
    loss_of(z * keep[:, None], l0 * keep).backward()
    for name, p in sae.named_parameters():
        assert torch.allclose(got[name], p.grad, atol=1e-4, rtol=1e-4), name
    assert got["log_threshold"].abs().sum() > 0


def test_jumprelu_l0_loss_holds_l0_at_k_and_its_threshold_stays_fp32_in_a_bf16_sae():
    sae = _sae("jumprelu", l0_coef=2.0)
    sae.init_b_dec(_x())
    sae.init_from_batch(_x())
    out = sae(_x())
    l0 = float((out.code.values > 0).sum(1).float().mean())
    assert float(out.extra) == pytest.approx(2.0 * (l0 / sae.k - 1) ** 2, rel=1e-5)
    half = make_sae(SAEConfig(16, 64, 4, kind="jumprelu"), dtype=torch.bfloat16)
    assert half.W_enc.dtype == torch.bfloat16 and half.log_threshold.dtype == torch.float32
    groups = half.optimizer_groups()
    assert groups[1]["params"] == [half.log_threshold] and groups[1]["lr_scale"] == THRESHOLD_LR_SCALE
    assert not JumpReLUSAE.uses_auxk


# ---------------------------------------------------------------- read-only kinds
def test_relu_and_gated_encode_as_saelens_defines_them():
    x = _x()
    relu = _sae("relu")
    pre = relu.pre_activations(x).detach()
    assert torch.allclose(_dense(relu.encode(x), 64), pre.clamp_min(0), atol=1e-6)
    gated = _sae("gated")
    with torch.no_grad():
        gated.b_gate.normal_(generator=torch.Generator().manual_seed(3))
        gated.r_mag.normal_(std=0.3, generator=torch.Generator().manual_seed(4))
        gated.b_mag.normal_(generator=torch.Generator().manual_seed(5))
    proj = gated.pre_activations(x).detach()
    want = ((proj + gated.b_gate) > 0) * torch.relu(proj * gated.r_mag.exp() + gated.b_mag)
    assert torch.allclose(_dense(gated.encode(x), 64), want.detach(), atol=1e-5)
    for sae in (relu, gated):
        with pytest.raises(Exception, match="not trained here"):
            sae(x)


# ---------------------------------------------------------------- every kind
@pytest.mark.parametrize("kind", TRAINABLE_KINDS)
def test_every_trainable_kind_learns_and_keeps_unit_decoder_rows(kind):
    torch.manual_seed(0)
    x = _x(n=256, seed=7)
    sae = _sae(kind)
    sae.init_b_dec(x)
    sae.init_from_batch(x)
    opt = torch.optim.Adam(sae.optimizer_groups(), lr=1e-2)
    first = None
    for _ in range(60):
        out = sae(x, torch.zeros(64, dtype=torch.bool), n_dead=0)
        loss = out.fvu + (out.extra if out.extra is not None else 0)
        opt.zero_grad()
        loss.backward()
        sae.remove_parallel_decoder_grad()
        opt.step()
        sae.normalize_decoder()
        sae.after_step(out.code, torch.ones(256, dtype=torch.bool))
        first = first if first is not None else float(out.fvu)
    assert float(out.fvu) < 0.7 * first
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    with torch.no_grad():
        l0 = (sae.encode(x).values > 0).sum(1).float().mean()
    assert 0.5 * sae.k <= float(l0) <= 2 * sae.k


@pytest.mark.parametrize("kind", sorted(SAE_KINDS))
def test_a_control_is_of_the_sae_s_kind_and_keeps_k_per_token(kind):
    sae = _sae(kind)
    control = random_like(sae, seed=3)
    assert is_control(control)
    assert control.cfg.kind == (kind if kind in TRAINABLE_KINDS else "topk")
    assert control.cfg.k == sae.k
    x = _x()
    assert torch.equal((control.encode(x).values > 0).sum(1), torch.full((x.shape[0],), sae.k))


@pytest.mark.parametrize("kind", sorted(TRAINABLE_KINDS))
def test_sampled_auxk_trains_the_dead_latents_of_every_kind_that_uses_auxk(kind):
    """`auxk_share` below 1 runs for every trainable kind: AuxK's gradient reaches the dead latents' decoder rows and no
    other's; a kind without AuxK (JumpReLU's L0 loss) reports none, sampled or not."""
    sae = make_sae(SAEConfig(16, 64, 4, kind=kind))
    sae.init_tied(torch.Generator().manual_seed(0))
    sae.per_token = False
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(1))
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:30] = True
    out = sae(x, dead, auxk_share=0.25)
    if not type(sae).uses_auxk:
        assert float(out.auxk_fvu) == 0
        return
    out.auxk_fvu.backward()
    assert float(out.auxk_fvu) > 0
    assert sae.W_dec.grad[~dead].abs().max() == 0 and sae.W_dec.grad[dead].abs().max() > 0
