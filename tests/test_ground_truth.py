"""The ground-truth benchmark: the generator makes what its config says (firing rates, hierarchy, correlation), the
scores count what they claim on hand-made SAEs (a perfect dictionary recovers everything, random directions nothing),
and `groundtruth make | score` run end to end; the decoder controls (frozen, soft-frozen) hold their decoders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saescope.api.ground_truth import greedy_matching, ground_truth_scores
from saescope.apps.groundtruth import MakeConfig, ScoreConfig, run_make, run_score
from saescope.core.data.synthetic import SyntheticConfig, SyntheticFeatures
from saescope.core.errors import SaescopeError
from saescope.core.io import load_saes
from saescope.core.sae import SAEConfig, make_sae, random_like
from saescope.core.train import TrainConfig, Trainer
from saescope.core.train.trainer import hold_near


def _features(**kw) -> SyntheticFeatures:
    base = dict(d=32, n_features=128, mean_active=4.0, correlated_pairs=8, hierarchical_pairs=8, seed=3)
    base.update(kw)
    return SyntheticFeatures(SyntheticConfig(**base))


def test_the_generator_makes_what_its_config_says():
    f = _features()
    x, truth = f.sample(40_000, torch.Generator().manual_seed(1))
    fires = truth > 0
    assert x.shape == (40_000, 32) and truth.shape == (40_000, 128)
    assert float(fires.sum(1).float().mean()) == pytest.approx(4.0, rel=0.03)
    assert torch.allclose(fires.float().mean(0).double(), f.effective_probability(), atol=0.006)
    # a child fires only with its parent, child_given_parent of the time
    parents, children = fires[:, f.parents], fires[:, f.children]
    assert not (children & ~parents).any()
    assert float(children.sum()) / float(parents.sum()) == pytest.approx(0.4, abs=0.03)
    # correlated pairs co-fire more than independence would give
    a, b = f.correlated[:, 0], f.correlated[:, 1]
    both = (fires[:, a] & fires[:, b]).float().mean(0)
    assert float(both.sum()) > 2 * float((fires[:, a].float().mean(0) * fires[:, b].float().mean(0)).sum())
    # x is the firing directions' sum plus the offset (and noise of sd 0.02)
    residual = x.double() - truth.double() @ f.directions - f.offset
    assert float(residual.std()) == pytest.approx(0.02, rel=0.05)
    assert torch.allclose(f.directions.norm(dim=1), torch.ones(128, dtype=torch.float64))
    g1, g2 = f.sample(10, torch.Generator().manual_seed(5)), _features().sample(10, torch.Generator().manual_seed(5))
    assert torch.equal(g1[0], g2[0])  # the seed decides everything
    with pytest.raises(SaescopeError, match="pairs need twice as many features"):
        SyntheticConfig(n_features=10, correlated_pairs=3, hierarchical_pairs=3)


def test_greedy_matching_pairs_each_latent_once():
    corr = np.array([[0.9, 0.8, 0.0], [0.85, 0.1, 0.0]])
    assert greedy_matching(corr).tolist() == [0.9, 0.1, 0.0]  # latent 0 to feature 0; latent 1 left with feature 1


def _perfect_sae(f: SyntheticFeatures) -> object:
    """A dictionary of the true features, encoding each sample by its true coefficients' support (an oracle)."""
    n, d = f.cfg.n_features, f.cfg.d
    sae = make_sae(SAEConfig(d, n, 16, kind="jumprelu"))
    with torch.no_grad():
        sae.W_dec.copy_(f.directions.float())
        sae.b_dec.copy_(f.offset.float())
    return sae


def test_scores_count_a_perfect_dictionary_and_random_directions():
    f = _features(noise=0.0, magnitude_sd=0.0, correlated_pairs=0)
    x, truth = f.sample(8000, torch.Generator().manual_seed(2))
    perfect = _perfect_sae(f)
    # the oracle encoder: with exact directions, least squares on the true support gives the true coefficients
    perfect.encode = lambda xs: _oracle_code(f, xs, truth)  # type: ignore[method-assign]
    got = ground_truth_scores(perfect, f, x, truth)
    assert got["recovered"] == 1.0 and got["mean_best_cos"] == pytest.approx(1.0)
    assert got["mcc"] == pytest.approx(1.0, abs=1e-6) and got["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert got["absorption"] == 0.0
    structure = got["recovered_by_structure"]
    assert {g: v["features"] for g, v in structure.items()} == {"unpaired": 128 - 2 * 8, "correlated": 0, "parents": 8,
                                                               "children": 8}
    assert structure["unpaired"]["recovered"] == 1.0 and structure["children"]["recovered"] == 1.0
    rnd = ground_truth_scores(random_like(make_sae(SAEConfig(32, 128, 4)), seed=1), f, x, truth)
    assert rnd["recovered"] == 0.0 and rnd["mean_best_cos"] < 0.7 and rnd["mcc"] < 0.5


def _oracle_code(f, xs, truth):
    from saescope.core.sae import SparseCode

    values, indices = truth[: len(xs)].topk(16, dim=1)
    return SparseCode(indices, values)


def test_groundtruth_make_train_score_end_to_end(tmp_path):
    make = MakeConfig(out=str(tmp_path / "gt"), d=16, n_features=64, mean_active=3.0, correlated_pairs=4,
                      hierarchical_pairs=4, samples=20_000, eval_samples=4096)
    result = run_make(make)
    arr = np.load(tmp_path / "gt" / "activations.npy")
    assert arr.shape == (20_000, 16) and arr.dtype == np.float32 and result.mean_active == pytest.approx(3.0, rel=0.05)
    with pytest.raises(SaescopeError, match="already holds a synthetic set"):
        run_make(make)
    train = TrainConfig(activations=str(tmp_path / "gt" / "activations.npy"), out=str(tmp_path / "run"), preset=None,
                        expansion=8, k=3, ctx_len=64, batch_size=8, max_tokens=60_000, lr=1e-2)
    Trainer(train).fit()
    scored = run_score(ScoreConfig(synthetic=str(tmp_path / "gt"), sae=[str(tmp_path / "run")]))
    rows = json.loads((tmp_path / "gt" / "scores.json").read_text())["rows"]
    assert [r["kind"] for r in rows] == ["topk", "topk"] and rows[1]["name"].startswith("random control")
    trained, control = rows
    assert trained["recovered"] > 0.1 > control["recovered"] == 0.0  # learned features the control does not have
    assert trained["mean_best_cos"] > control["mean_best_cos"] + 0.15
    assert trained["train_tok_s"] > 0 and "recovered" in scored.text() and "children" in scored.text()
    structure = trained["recovered_by_structure"]
    assert sum(g["features"] for g in structure.values()) == 64 and structure["children"]["features"] == 4
    unpaired = structure["unpaired"]
    assert unpaired["features"] == 64 - 2 * 4 - 2 * 4 and 0 <= unpaired["recovered"] <= 1


def test_hold_near_keeps_rows_at_the_cosine_floor():
    init = torch.nn.functional.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    W = torch.nn.functional.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    before = (W * init).sum(1)
    hold_near(W, init, 0.8)
    after = (W * init).sum(1)
    assert torch.allclose(W.norm(dim=1), torch.ones(50), atol=1e-6)
    assert torch.allclose(after[before < 0.8], torch.full_like(after[before < 0.8], 0.8), atol=1e-5)
    assert torch.equal(after[before >= 0.8], before[before >= 0.8])


@pytest.mark.parametrize("decoder", ["frozen", "soft-frozen"])
def test_the_decoder_controls_train_the_encoder_and_hold_the_decoder(decoder, tmp_path):
    np.save(tmp_path / "a.npy", np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32) * 3)
    base = dict(activations=str(tmp_path / "a.npy"), preset=None, expansion=4, k=4, ctx_len=32, batch_size=4,
                max_tokens=128 * 40, lr=3e-2)
    Trainer(TrainConfig(out=str(tmp_path / "trained"), **base)).fit()
    Trainer(TrainConfig(out=str(tmp_path / decoder), decoder=decoder, **base)).fit()
    trained, control = load_saes(tmp_path / "trained")[0], load_saes(tmp_path / decoder)[0]
    init = make_sae(SAEConfig(16, 64, 4))
    init.init_tied(torch.Generator().manual_seed(0 * 100_003 + 0))  # the trainer's init of layer 0 at seed 0
    cos = (control.W_dec * init.W_dec).sum(1)
    if decoder == "frozen":
        assert torch.equal(control.W_dec, init.W_dec)
    else:
        assert float(cos.min()) >= 0.8 - 1e-5 and float(cos.max()) < 1
    assert not torch.equal(control.W_enc, init.W_enc)  # the encoder learned
    assert control.meta["control"]["kind"] == {"frozen": "frozen-decoder", "soft-frozen": "soft-frozen"}[decoder]
    assert float((trained.W_dec * init.W_dec).sum(1).min()) < 0.8  # the trained decoder moved further


def test_the_per_token_warm_up_lets_batchtopk_find_the_features(tmp_path):
    """BatchTopK's batch-wide selection from a random init starves most samples of latents and the decoder learns
    little; with the first half of the steps per token it recovers true features (bench/RESULTS.md has the full size)."""
    run_make(MakeConfig(out=str(tmp_path / "gt"), d=32, n_features=256, mean_active=4.0, samples=40_000, eval_samples=4096))
    for warmup in (0.0, 0.5):
        Trainer(TrainConfig(activations=str(tmp_path / "gt" / "activations.npy"), out=str(tmp_path / f"w{warmup}"),
                            preset=None, arch="batchtopk", expansion=16, k=4, ctx_len=64, batch_size=8,
                            max_tokens=200_000, per_token_warmup=warmup)).fit()
    run_score(ScoreConfig(synthetic=str(tmp_path / "gt"), sae=[str(tmp_path / "w0.0"), str(tmp_path / "w0.5")]))
    cold, warm = json.loads((tmp_path / "gt" / "scores.json").read_text())["rows"][:2]
    assert warm["recovered"] > max(0.1, cold["recovered"] + 0.1)  # measured: 0.168 against 0.008
    assert warm["mean_best_cos"] > cold["mean_best_cos"] + 0.1  # 0.742 against 0.584
