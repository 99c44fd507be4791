"""The SAE maths (sae/topk.py) against the recipe written densely and numbers worked out by hand."""

import pytest
import torch

from saescope.core.errors import SaescopeError
from saescope.core.sae import SAEConfig, SparseCode, TopKSAE, Workspace, default_lr


def _sae(d_model: int = 16, d_sae: int = 64, k: int = 4, seed: int = 0, dtype: torch.dtype = torch.float64) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_model, d_sae, k), dtype=dtype)
    sae.init_tied(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
        sae.b_dec.normal_()
    return sae


def _dense_reference(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor | None):
    """The recipe written densely, line by line: ReLU, top-k, z @ W_dec + b_dec, FVU, AuxK."""
    pre = x @ sae.W_enc.T + sae.b_enc
    v, i = pre.relu().topk(sae.k, -1)
    z = torch.zeros_like(pre).scatter(-1, i, v)
    x_hat = z @ sae.W_dec + sae.b_dec
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    aux = x.new_zeros(())
    if dead is not None:
        n_dead = int(dead.sum())
        k_aux = min(sae.cfg.d_model // 2, n_dead)
        e = (x - x_hat).detach()
        av, ai = pre.masked_fill(~dead, float("-inf")).topk(k_aux, -1)
        za = torch.zeros_like(pre).scatter(-1, ai, av.relu())
        aux = min(n_dead / k_aux, 1.0) * ((za @ sae.W_dec - e) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    return x_hat, fvu, aux


@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("d_sae", [64, 1024])  # 1024: top-k through two levels of group maxima
@pytest.mark.parametrize("workspace", [None, Workspace()])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32 on CPU: the fused top-k kernel when built
def test_forward_and_gradients_match_dense_reference(with_dead, d_sae, workspace, dtype):
    sae = _sae(d_sae=d_sae, dtype=dtype)
    x = torch.randn(32, 16, dtype=dtype, requires_grad=True)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[:20] = True
    out = sae(x, dead if with_dead else None, workspace=workspace)
    if workspace is not None:  # the buffer is reused, not regrown, by a second smaller batch
        buffer = workspace.pre_activations(32, d_sae, dtype, x.device)
        assert workspace.pre_activations(16, d_sae, dtype, x.device).data_ptr() == buffer.data_ptr()
    (out.fvu + out.auxk_fvu).backward()
    got = [p.grad.clone() for p in sae.parameters()] + [x.grad.clone()]
    sae.zero_grad()
    x.grad = None
    x_hat, fvu, aux = _dense_reference(sae, x, dead if with_dead else None)
    (fvu + aux).backward()
    want = [p.grad.clone() for p in sae.parameters()] + [x.grad.clone()]
    tol = {"atol": 1e-12} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-4}
    assert torch.allclose(out.x_hat, x_hat, **tol)
    assert torch.allclose(out.fvu, fvu, **tol) and torch.allclose(out.auxk_fvu, aux, **tol)
    assert with_dead == (float(aux.detach()) > 0)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, **tol)


@pytest.mark.parametrize("share,rows", [(0.25, 8), (0.3, 10), (0.01, 2)])
@pytest.mark.parametrize("weighted,centred", [(False, False), (True, False), (True, True)])
def test_sampled_auxk_is_the_dense_reference_on_the_first_rows(share, rows, weighted, centred):
    """auxk_share < 1: AuxK over the first ceil(share x tokens) tokens only, the same loss and gradients as the dense
    reference computed on those tokens; the reconstruction loss still reads every token, and AuxK's gradient reaches
    the dead latents' rows alone."""
    sae = _sae(d_sae=64, dtype=torch.float64)
    sae.centred = centred
    x = torch.randn(32, 16, dtype=torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[5:25] = True
    weights = (torch.rand(32, generator=torch.Generator().manual_seed(3)) > 0.2).double() if weighted else None
    out = sae(x, dead, weights=weights, auxk_share=share)
    out.auxk_fvu.backward()
    got_enc, got_dec = sae.W_enc.grad.clone(), sae.W_dec.grad.clone()
    sae.zero_grad()
    full = sae(x, None, weights=weights)
    assert torch.allclose(out.fvu, full.fvu, atol=1e-12) and torch.allclose(out.x_hat, full.x_hat, atol=1e-12)
    keep = torch.ones(rows, dtype=torch.bool) if weights is None else weights[:rows] > 0
    x_hat = full.x_hat.detach()
    pre = (x[:rows] - sae.b_dec) @ sae.W_enc.T + sae.b_enc if sae.centred else x[:rows] @ sae.W_enc.T + sae.b_enc
    k_aux = min(sae.cfg.d_model // 2, 20)
    av, ai = pre.masked_fill(~dead, float("-inf")).topk(k_aux, -1)
    za = torch.zeros_like(pre).scatter(-1, ai, av.relu())
    e = (x[:rows] - x_hat[:rows])[keep]
    want = ((za[keep] @ sae.W_dec - e) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    if len(e) < 2:  # one kept token: no variance to explain, no loss (and no NaN)
        assert float(out.auxk_fvu) == 0
        return
    assert torch.allclose(out.auxk_fvu, want, atol=1e-12)
    want.backward()
    assert torch.allclose(got_enc, sae.W_enc.grad, atol=1e-12) and torch.allclose(got_dec, sae.W_dec.grad, atol=1e-12)
    assert got_enc[~dead].abs().max() == 0 and got_dec[~dead].abs().max() == 0 and got_enc[dead].abs().max() > 0


def test_encode_by_hand():
    """Two latents, k=1, numbers worked out on paper."""
    sae = TopKSAE(SAEConfig(2, 3, 1))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.5, -2.0]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        sae.b_dec.copy_(torch.tensor([0.1, -0.1]))
    x = torch.tensor([[2.0, 1.0], [-1.0, -1.0]])
    code = sae.encode(x)
    # pre = [[2, 1.5, 1], [-1, -0.5, -4]] -> token 0 keeps latent 0 (2.0); token 1 keeps latent 1 at ReLU 0.
    assert code.indices[0].tolist() == [0] and code.values[0].tolist() == [2.0]
    assert code.values[1].tolist() == [0.0]
    assert torch.allclose(sae.decode(code), torch.tensor([[2.1, -0.1], [0.1, -0.1]]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32 on CPU: the kernels when built
def test_decoder_norm_constraint(dtype):
    sae = _sae(dtype=dtype)
    x = torch.randn(64, 16, dtype=dtype)
    sae(x).fvu.backward()
    sae.remove_parallel_decoder_grad()
    # the remaining gradient is orthogonal to every decoder row: a small step keeps the norms at 1
    atol = 1e-12 if dtype == torch.float64 else 1e-6
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(64, dtype=dtype), atol=atol)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
        sae.W_dec[5] = 0.0  # a zero row stays zero (the norm is floored at eps), never NaN
    sae.normalize_decoder()
    norms = sae.W_dec.norm(dim=1)
    assert norms[5] == 0 and torch.allclose(norms[torch.arange(64) != 5], torch.ones(63, dtype=dtype))


def test_init_is_tied_and_centred():
    sae = TopKSAE(SAEConfig(8, 32, 4))
    sae.init_tied(torch.Generator().manual_seed(1))
    assert torch.equal(sae.W_enc, sae.W_dec)
    x = torch.randn(100, 8) + 5
    sae.init_b_dec(x)
    assert torch.allclose(sae.b_dec, x.mean(0), atol=1e-6)
    # encoding the mean gives zero pre-activations: b_enc cancels W_enc @ b_dec
    assert torch.allclose(sae.pre_activations(x.mean(0, keepdim=True)), torch.zeros(1, 32), atol=1e-5)


def test_sparse_code_dense_and_shapes():
    code = SparseCode(torch.tensor([[2, 0]]), torch.tensor([[1.5, 0.0]]))
    assert code.dense(4).tolist() == [[0.0, 0.0, 1.5, 0.0]]
    sae = _sae()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    assert sae.reconstruct(x).shape == x.shape


def test_config_errors_and_lr():
    with pytest.raises(SaescopeError, match="k=70"):
        SAEConfig(8, 64, 70)
    with pytest.raises(SaescopeError):
        SAEConfig(0, 64, 4)
    assert default_lr(2**14) == pytest.approx(2e-4)
    assert default_lr(4 * 2**14) == pytest.approx(1e-4)


def test_zero_weights_equal_dropping_the_tokens():
    """The outlier filter's 0/1 token weights give the same losses and gradients as removing the tokens."""
    sae = _sae()
    x = torch.randn(40, 16, dtype=torch.float64)
    keep = torch.rand(40, generator=torch.Generator().manual_seed(5)) > 0.3
    dead = torch.zeros(64, dtype=torch.bool)
    dead[10:30] = True
    out_w = sae(x, dead, weights=keep.double())
    (out_w.fvu + out_w.auxk_fvu).backward()
    got = [p.grad.clone() for p in sae.parameters()]
    sae.zero_grad()
    out_d = sae(x[keep], dead)
    (out_d.fvu + out_d.auxk_fvu).backward()
    assert torch.allclose(out_w.fvu, out_d.fvu) and torch.allclose(out_w.auxk_fvu, out_d.auxk_fvu)
    for g, p in zip(got, sae.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-12)


def test_latent_grouping_is_built_once_and_only_for_training():
    """The training forward hands its grouping of the selected latents to the decoder's backward (one argsort
    for both weight gradients); an evaluation forward under no_grad builds none."""
    sae = _sae(dtype=torch.float32)
    x = torch.randn(32, 16)
    with torch.no_grad():
        assert sae(x).code.groups is None
    out = sae(x)
    groups = out.code.groups
    assert groups is not None and groups.offsets[-1] == 32 * sae.k
    assert torch.equal(torch.sort(out.code.indices.reshape(-1)).values, out.code.indices.reshape(-1)[groups.order])


def test_decoder_constraint_counts_as_an_in_place_change():
    """Renormalising the decoder between a forward and its backward must fail loudly, kernels or not."""
    sae = _sae(dtype=torch.float32)
    out = sae(torch.randn(32, 16))
    sae.normalize_decoder()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.fvu.backward()
