import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saescope import SaescopeError
from saescope.core.sae import SAEConfig, TopKSAE, is_control, principal_basis, random_like


def _trained_like(d_model=32, d_sae=128, k=6, seed=0) -> TopKSAE:
    sae = TopKSAE(SAEConfig(d_model, d_sae, k))
    sae.init_tied(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(d_model, generator=torch.Generator().manual_seed(99)))
    sae.meta = {"model": "m", "layer": 3, "tokens": 10}
    return sae


def test_control_shape_units_tied_and_centred():
    sae = _trained_like()
    c = random_like(sae, seed=1)
    assert (c.cfg.d_model, c.cfg.d_sae, c.cfg.k) == (32, 128, 6)
    assert torch.allclose(c.W_dec.norm(dim=1), torch.ones(128), atol=1e-6)
    assert torch.equal(c.W_enc, c.W_dec)
    assert torch.equal(c.b_dec, sae.b_dec)
    # each latent reads the projection of the centred input on its direction
    x = torch.randn(5, 32)
    pre = c.pre_activations(x)
    assert torch.allclose(pre, (x - sae.b_dec) @ c.W_dec.T, atol=1e-5)
    assert is_control(c) and not is_control(sae)
    assert c.meta["layer"] == 3 and "tokens" not in c.meta
    # not the trained directions, and a different seed gives different ones
    assert (c.W_dec * sae.W_dec).sum(1).abs().max() < 0.9
    assert not torch.equal(random_like(sae, seed=2).W_dec, c.W_dec)
    assert torch.equal(random_like(sae, seed=1).W_dec, c.W_dec)


def test_control_l0_equals_k():
    c = random_like(_trained_like(d_model=64, d_sae=512, k=16), seed=0)
    code = c.encode(torch.randn(200, 64) * 3)
    assert float((code.values > 0).float().sum(1).mean()) == 16.0


def test_principal_basis_hand_example():
    # variance only along e0 (scale 10) and e1 (scale 1): 90% needs only e0, 99.9% needs both
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(400, 5)
    x[:, 0] = 10 * torch.randn(400, generator=g)
    x[:, 1] = torch.randn(400, generator=g)
    b90 = principal_basis(x, 0.9)
    assert b90.shape == (1, 5) and abs(abs(float(b90[0, 0])) - 1) < 1e-4
    b999 = principal_basis(x, 0.999)
    assert b999.shape == (2, 5)
    assert torch.allclose(b999 @ b999.T, torch.eye(2), atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(r=st.integers(1, 6), seed=st.integers(0, 1000))
def test_subspace_control_stays_in_span(r, seed):
    basis = torch.linalg.qr(torch.randn(16, r, generator=torch.Generator().manual_seed(seed)))[0].T
    c = random_like(_trained_like(d_model=16, d_sae=40, k=3), seed=seed, basis=basis)
    residual = c.W_dec - (c.W_dec @ basis.T) @ basis
    assert residual.abs().max() < 1e-5
    assert c.meta["control"]["subspace_dim"] == r


def test_control_bad_basis_and_variance():
    with pytest.raises(SaescopeError, match="basis must have shape"):
        random_like(_trained_like(), basis=torch.randn(3, 7))
    with pytest.raises(SaescopeError, match="variance"):
        principal_basis(torch.randn(10, 4), 1.5)
