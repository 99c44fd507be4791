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


def test_eval_with_two_controls_writes_each_margin_with_its_se_and_says_it(tiny_sae_dir, tiny_qwen3, text_file, tmp_path):
    """`eval --control A --control B`: the first control's figures stay where files have always had them, every control
    gets its margins (paired SEs over sequences) in eval.json and the printed text; the SAEs given as their own control
    have margin 0; a control named twice is refused."""
    import json
    import shutil

    from saescope.api.evaluate import EvalConfig, read_results, run_eval
    from saescope.core.errors import ParamError
    from saescope.core.io import load_saes

    run = tmp_path / "run"
    shutil.copytree(tiny_sae_dir, run)
    saes = load_saes(run)
    save_controls(make_controls(saes, seed=3), tmp_path / "random", like=str(run))
    result = run_eval(EvalConfig(sae=str(run), model=str(tiny_qwen3), data=str(text_file), n_tokens=256, ctx_len=32,
                                 control=[str(tmp_path / "random"), str(run)]))
    body = json.loads((run / "eval.json").read_text())
    assert [m["control"] for m in body["margins"]] == [str(tmp_path / "random"), str(run)]
    assert body["margins"][0]["kind"] == "random" and body["margins"][1]["kind"] == "not a control"
    assert body["control"] == body["margins"][0]["figures"]  # the first control, where files have always had it
    for sae_row, ctl_row, m in zip(body["layers"], body["control"], body["margins"][0]["layers"]):
        assert m["fvu"] == pytest.approx(ctl_row["fvu"] - sae_row["fvu"], rel=1e-4, abs=1e-8) and m["fvu_se"] > 0
    assert all(m["fvu"] == 0 and m["fvu_se"] == 0 for m in body["margins"][1]["layers"])
    assert read_results(run / "eval.json")["margins"] == body["margins"]
    assert "margin over random control" in result.text() and "FVU nil" in result.text()
    with pytest.raises(ParamError, match="the same control twice"):
        EvalConfig(sae=str(run), control=[str(run), str(run)])
