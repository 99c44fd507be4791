import pytest
import torch

from saescope import SaescopeError
from saescope.api.controls import load_control, make_controls, save_controls
from saescope.core.io import save_native
from saescope.core.sae import SAEConfig, TopKSAE


def _saes(k=4, layers=(0, 2)) -> dict[int, TopKSAE]:
    out = {}
    for n in layers:
        sae = TopKSAE(SAEConfig(16, 64, k))
        sae.init_tied(torch.Generator().manual_seed(n))
        out[n] = sae
    return out


def test_controls_round_trip_and_differ_per_layer(tmp_path):
    saes = _saes()
    controls = make_controls(saes, seed=7)
    save_controls(controls, tmp_path / "c", like="runs/x")
    loaded = load_control(tmp_path / "c", saes)
    assert sorted(loaded) == [0, 2]
    for n in saes:
        assert torch.equal(loaded[n].W_dec, controls[n].W_dec)
        assert loaded[n].meta["control"]["like"] == "runs/x" and loaded[n].meta["control"]["seed"] == 7 * 100_003 + n
    assert not torch.equal(controls[0].W_dec, controls[2].W_dec)


def test_load_control_refuses_what_does_not_match(tmp_path):
    saes = _saes()
    for n, sae in _saes(k=5).items():
        save_native(sae, tmp_path / "k5", n)
    with pytest.raises(SaescopeError, match="k 5.*k 4"):
        load_control(tmp_path / "k5", saes)
    save_native(_saes(layers=(0,))[0], tmp_path / "one", 0)
    with pytest.raises(SaescopeError, match="no SAE for layer 2"):
        load_control(tmp_path / "one", saes)
    with pytest.raises(SaescopeError, match="needs the model"):
        make_controls(saes, subspace="pca")


def test_control_directions_are_not_a_trainer_initialisation():
    # the trainer initialises layer n of seed s from Generator(s * 100_003 + n); a control must not repeat it
    saes = _saes(layers=(15,))
    for seed in (0, 1):
        init = TopKSAE(SAEConfig(16, 64, 4))
        init.init_tied(torch.Generator().manual_seed(seed * 100_003 + 15))
        control = make_controls(saes, seed=seed)[15]
        assert float((init.W_dec * control.W_dec).detach().sum(1).abs().max()) < 0.99
