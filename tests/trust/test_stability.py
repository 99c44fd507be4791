import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saescope import SaescopeError
from saescope.apps.trust import activation_match, decoder_match, stability_report
from saescope.core.sae import SAEConfig, TopKSAE


def _greedy_by_sorting_all_pairs(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    a = torch.nn.functional.normalize(a, dim=1)
    b = torch.nn.functional.normalize(b, dim=1)
    sims = (a @ b.T).numpy()
    order = np.argsort(-sims, axis=None, kind="stable")
    out = [-1] * a.shape[0]
    used_b = set()
    for flat in order:
        i, j = divmod(int(flat), b.shape[0])
        if out[i] == -1 and j not in used_b:
            out[i] = j
            used_b.add(j)
    return out


def test_hand_example():
    # A0 prefers B1 (cos 0.8), but A1 fits B1 better (1.0) and takes it first; A0 is left with B0 (0.6)
    a = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    m = decoder_match(a, b, candidates=1)
    assert m.assigned.tolist() == [0, 1]
    assert torch.allclose(m.assigned_cos, torch.tensor([0.6, 1.0]))
    assert torch.allclose(m.best_ab, torch.tensor([0.8, 1.0]))
    assert torch.allclose(m.best_ba, torch.tensor([0.6, 1.0]))


def test_permutation_is_recovered():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 24, generator=g)
    perm = torch.randperm(300, generator=g)
    b = a[perm] + 0.01 * torch.randn(300, 24, generator=g)
    m = decoder_match(a, b, chunk=64, candidates=3)
    inverse = torch.argsort(perm)
    assert torch.equal(m.assigned, inverse)
    assert float(m.assigned_cos.min()) > 0.99


@settings(max_examples=40, deadline=None)
@given(n_a=st.integers(1, 30), n_b=st.integers(1, 30), d=st.integers(2, 8), cand=st.integers(1, 4),
       chunk=st.integers(1, 16), seed=st.integers(0, 10_000))
def test_greedy_with_short_lists_equals_greedy_over_all_pairs(n_a, n_b, d, cand, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n_a, d, generator=g), torch.randn(n_b, d, generator=g)
    m = decoder_match(a, b, chunk=chunk, candidates=cand)
    assert m.assigned.tolist() == _greedy_by_sorting_all_pairs(a, b)
    assert int((m.assigned >= 0).sum()) == min(n_a, n_b)
    full = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    assert torch.allclose(m.best_ab, full.max(1).values, atol=1e-6)
    assert torch.allclose(m.best_ba, full.max(0).values, atol=1e-6)


def _sae(seed: int, d_model=16, d_sae=48, k=4) -> TopKSAE:
    sae = TopKSAE(SAEConfig(d_model, d_sae, k))
    sae.init_tied(torch.Generator().manual_seed(seed))
    return sae


def test_activation_correlations_match_dense_reference():
    a, b = _sae(0), _sae(1)
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(3))
    assigned = torch.arange(48).flip(0)
    got = activation_match(a, b, x, assigned, chunk=7)
    za, zb = (s.encode(x).dense(48).detach().double().numpy() for s in (a, b))
    for i in range(48):
        if za[:, i].std() == 0:
            assert not got.alive_a[i] and math.isnan(float(got.best_corr[i]))
            continue
        corrs = [np.corrcoef(za[:, i], zb[:, j])[0, 1] if zb[:, j].std() > 0 else -2 for j in range(48)]
        assert float(got.best_corr[i]) == pytest.approx(max(corrs), abs=1e-4)
        want = corrs[int(assigned[i])]
        if want == -2:
            assert math.isnan(float(got.assigned_corr[i]))
        else:
            assert float(got.assigned_corr[i]) == pytest.approx(want, abs=1e-4)
    assert torch.allclose(got.freq_a, torch.tensor((za > 0).mean(0), dtype=torch.float32))


def test_report_same_sae_is_fully_stable_and_shapes_must_agree():
    a = _sae(0)
    x = torch.randn(400, 16, generator=torch.Generator().manual_seed(1))
    rep = stability_report(a, a, x)
    assert rep["decoder"]["one_to_one"] == {"0.5": 1.0, "0.7": 1.0, "0.9": 1.0}
    assert rep["activations"]["max_corr"]["0.9"] == pytest.approx(1.0)
    other = stability_report(a, _sae(5), x)
    assert other["decoder"]["one_to_one"]["0.9"] < 0.2  # independent random decoders hardly match
    with pytest.raises(SaescopeError, match="different shapes"):
        stability_report(a, _sae(0, d_sae=64))
