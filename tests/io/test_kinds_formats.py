"""Every SAE kind through every format that holds it: saescope's own files (exact round trips), SAELens folders written
by saescope and written by hand in SAELens's layout (each architecture against SAELens's own encode), and Gemma Scope's
params.npz (the file, or a folder of layer_{n}/.../params.npz); and the bad files of each, refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saescope.core.errors import SaescopeError
from saescope.core.io import export_saes, fingerprint, load_saes, save_native
from saescope.core.sae import SAE_KINDS, TRAINABLE_KINDS, SAEConfig, make_sae


def _trained_like(kind: str, seed: int = 0, d_model: int = 16, d_sae: int = 64, k: int = 4):
    """An SAE of `kind` with every tensor set (a threshold too), as if trained."""
    sae = make_sae(SAEConfig(d_model, d_sae, k, kind=kind))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.init_tied(g)
        sae.W_enc.add_(0.1 * torch.randn(sae.W_enc.shape, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(torch.randn(d_model, generator=g))
        if kind in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.3)
        if kind == "jumprelu":
            sae.log_threshold.copy_((0.2 + torch.rand(d_sae, generator=g)).log())
        if kind == "gated":
            for name in ("b_gate", "r_mag", "b_mag"):
                getattr(sae, name).copy_(0.2 * torch.randn(d_sae, generator=g))
    sae.meta = {"model": "m"}
    return sae


def _x(d_model: int = 16) -> torch.Tensor:
    return torch.randn(32, d_model, generator=torch.Generator().manual_seed(9)) * 2


@pytest.mark.parametrize("kind", sorted(SAE_KINDS))
def test_native_round_trip_is_exact_for_every_kind(kind, tmp_path):
    sae = _trained_like(kind)
    save_native(sae, tmp_path, 3)
    back = load_saes(tmp_path)[3]
    assert back.cfg == sae.cfg
    for name, t in {**{n: getattr(sae, n) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}, **sae.extra_tensors()}.items():
        assert torch.equal(getattr(back, name) if name not in back.extra_tensors() else back.extra_tensors()[name], t.detach())
    x = _x()
    assert torch.equal(back.encode(x).dense(64), sae.encode(x).dense(64))
    assert json.loads((tmp_path / "layer3.json").read_text())["kind"] == kind
    assert fingerprint(back) == fingerprint(sae)


def test_fingerprints_tell_kinds_and_thresholds_apart_but_top_k_keeps_its_old_hash():
    import hashlib

    top = _trained_like("topk")
    h = hashlib.sha1(b"16x64k4")
    h.update(top.W_dec.detach().numpy().tobytes())
    h.update(top.b_dec.detach().numpy().tobytes())
    assert fingerprint(top) == h.hexdigest()[:16]  # the hash feature stores written before kinds existed hold
    a, b = _trained_like("jumprelu"), _trained_like("jumprelu")
    with torch.no_grad():
        b.log_threshold.add_(0.1)
    assert fingerprint(a) != fingerprint(b)


@pytest.mark.parametrize("kind", [*TRAINABLE_KINDS, "relu"])
def test_saelens_export_reads_back_with_the_same_codes(kind, tmp_path):
    sae = _trained_like(kind)
    export_saes({5: sae}, tmp_path, "saelens")
    cfg = json.loads((tmp_path / "layer5" / "cfg.json").read_text())
    assert cfg["architecture"] == {"topk": "topk", "relu": "standard"}.get(kind, "jumprelu")
    back = load_saes(tmp_path / "layer5")[5]
    x = _x()
    assert torch.allclose(back.encode(x).dense(64), sae.encode(x).dense(64), atol=1e-5)
    assert torch.allclose(back.reconstruct(x), sae.reconstruct(x), atol=1e-5)
    assert back.cfg.k == sae.cfg.k  # recorded in the metadata for the kinds SAELens gives no k


def test_a_control_of_a_threshold_kind_exports_as_top_k(tmp_path):
    from saescope.core.sae import random_like

    control = random_like(_trained_like("jumprelu"), seed=1)
    export_saes({2: control}, tmp_path, "saelens")
    assert json.loads((tmp_path / "layer2" / "cfg.json").read_text())["architecture"] == "topk"
    back = load_saes(tmp_path / "layer2")[2]
    assert torch.allclose(back.reconstruct(_x()), control.reconstruct(_x()), atol=1e-5)


def test_an_export_a_format_cannot_hold_is_refused_before_anything_is_written(tmp_path):
    saes = {0: _trained_like("topk"), 1: _trained_like("jumprelu")}
    with pytest.raises(SaescopeError, match="layer 1 is a jumprelu SAE; the Qwen-Scope format holds top-k SAEs only"):
        export_saes(saes, tmp_path / "qs", "qwen-scope")
    assert not (tmp_path / "qs").exists()
    with pytest.raises(SaescopeError, match="gated"):
        export_saes({0: _trained_like("gated")}, tmp_path / "sl", "saelens")


# ---------------------------------------------------------------- SAELens folders as SAELens writes them
def _saelens_folder(folder, arch: str, tensors: dict, *, apply_b_dec: bool = True, **cfg) -> None:
    folder.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(folder / "sae_weights.safetensors"))
    d_in, d_sae = tensors["W_enc"].shape
    (folder / "cfg.json").write_text(json.dumps({"architecture": arch, "d_in": d_in, "d_sae": d_sae,
                                                 "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none",
                                                 "metadata": {"hook_name": "blocks.7.hook_resid_post"}, **cfg}))


def _saelens_tensors(seed: int = 0, d_in: int = 16, d_sae: int = 48) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d_in, d_sae, generator=g) * 0.3, "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.3,
            "b_enc": torch.randn(d_sae, generator=g) * 0.1, "b_dec": torch.randn(d_in, generator=g)}


def test_saelens_jumprelu_standard_and_gated_folders_encode_as_saelens_does(tmp_path):
    x = _x()
    t = _saelens_tensors()
    sae_in = x - t["b_dec"]  # apply_b_dec_to_input
    # jumprelu (SAELens: feature_acts = ReLU(pre) * (pre > threshold))
    theta = torch.rand(48, generator=torch.Generator().manual_seed(1)) * 0.3
    _saelens_folder(tmp_path / "jr", "jumprelu", {**t, "threshold": theta})
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    want = torch.relu(pre) * (pre > theta)
    sae = load_saes(tmp_path / "jr", k=10)[7]
    assert sae.cfg.kind == "jumprelu" and sae.cfg.k == 10
    assert torch.allclose(sae.encode(x).dense(48), want, atol=1e-5)
    assert torch.allclose(sae.reconstruct(x), want @ t["W_dec"] + t["b_dec"], atol=1e-4)
    # standard (ReLU)
    _saelens_folder(tmp_path / "std", "standard", t)
    assert torch.allclose(load_saes(tmp_path / "std")[7].encode(x).dense(48), torch.relu(pre), atol=1e-5)
    # gated: gate = sae_in W_enc + b_gate; magnitude = ReLU(sae_in (W_enc exp(r_mag)) + b_mag)
    g = torch.Generator().manual_seed(2)
    gated = {n: v for n, v in t.items() if n != "b_enc"}
    gated.update(b_gate=torch.randn(48, generator=g) * 0.2, r_mag=torch.randn(48, generator=g) * 0.2,
                 b_mag=torch.randn(48, generator=g) * 0.2)
    _saelens_folder(tmp_path / "gated", "gated", gated)
    proj = sae_in @ t["W_enc"]
    want = ((proj + gated["b_gate"]) > 0) * torch.relu(proj * gated["r_mag"].exp() + gated["b_mag"])
    assert torch.allclose(load_saes(tmp_path / "gated")[7].encode(x).dense(48), want, atol=1e-5)


def test_bad_saelens_jumprelu_folders_are_refused_in_one_line(tmp_path):
    t = _saelens_tensors()
    _saelens_folder(tmp_path / "short", "jumprelu", {**t, "threshold": torch.ones(40)})
    with pytest.raises(SaescopeError, match=r"threshold has shape \(40,\), expected \(48,\)"):
        load_saes(tmp_path / "short")
    _saelens_folder(tmp_path / "none", "jumprelu", t)
    with pytest.raises(SaescopeError, match="lacks threshold"):
        load_saes(tmp_path / "none")
    bad = dict(t)
    bad["W_dec"] = torch.randn(48, 15)
    _saelens_folder(tmp_path / "dec", "jumprelu", {**bad, "threshold": torch.ones(48)})
    with pytest.raises(SaescopeError, match="W_dec has shape"):
        load_saes(tmp_path / "dec")
    _saelens_folder(tmp_path / "neg", "jumprelu", {**t, "threshold": -torch.ones(48)})
    with pytest.raises(SaescopeError, match="negative"):
        load_saes(tmp_path / "neg")


# ---------------------------------------------------------------- Gemma Scope
def _gemma(path, seed: int = 0, d_in: int = 16, d_sae: int = 48, drop: str | None = None) -> dict:
    t = {n: v.numpy() for n, v in _saelens_tensors(seed, d_in, d_sae).items()}
    t["threshold"] = (np.random.default_rng(seed).random(d_sae) * 0.3).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{n: v for n, v in t.items() if n != drop})
    return t


def test_gemma_scope_params_npz_the_file_and_a_folder_of_layers(tmp_path):
    x = _x()
    t = _gemma(tmp_path / "layer_20" / "width_16k" / "average_l0_71" / "params.npz")
    _gemma(tmp_path / "layer_3" / "width_16k" / "average_l0_12" / "params.npz", seed=1)
    pre = x @ torch.from_numpy(t["W_enc"]) + torch.from_numpy(t["b_enc"])  # Gemma Scope subtracts nothing
    want = torch.relu(pre) * (pre > torch.from_numpy(t["threshold"]))
    single = load_saes(tmp_path / "layer_20" / "width_16k" / "average_l0_71" / "params.npz")
    assert list(single) == [20] and single[20].cfg.kind == "jumprelu"
    assert single[20].cfg.k == 48  # average_l0_71 > d_sae 48: no usable L0 in the path, so no cap (d_sae)
    assert torch.allclose(single[20].encode(x).dense(48), want, atol=1e-5)
    both = load_saes(tmp_path)
    assert sorted(both) == [3, 20] and both[3].cfg.k == 12
    assert torch.allclose(both[20].reconstruct(x), want @ torch.from_numpy(t["W_dec"]) + torch.from_numpy(t["b_dec"]),
                          atol=1e-4)
    assert sorted(load_saes(tmp_path, layers=[3])) == [3]


def test_bad_gemma_scope_files_are_refused_in_one_line(tmp_path):
    _gemma(tmp_path / "a" / "params.npz", drop="threshold")
    with pytest.raises(SaescopeError, match="threshold is missing"):
        load_saes(tmp_path / "a" / "params.npz")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "params.npz").write_bytes(b"not a zip")
    with pytest.raises(SaescopeError, match="not a readable .npz"):
        load_saes(tmp_path / "b" / "params.npz")
    _gemma(tmp_path / "two" / "layer_4" / "width_16k" / "average_l0_10" / "params.npz")
    _gemma(tmp_path / "two" / "layer_4" / "width_65k" / "average_l0_10" / "params.npz", seed=2)
    with pytest.raises(SaescopeError, match="two Gemma Scope SAEs for layer 4"):
        load_saes(tmp_path / "two")


@pytest.mark.parametrize("kind", TRAINABLE_KINDS)
def test_a_centred_sae_is_saved_folded_and_encodes_the_same(kind, tmp_path):
    """Training encodes x - b_dec; files hold b_enc - W_enc b_dec: the loaded SAE (plain, encoding x) gives the same
    codes and reconstructions, in saescope's format and SAELens's; a centred SAE starts with b_enc = 0."""
    sae = _trained_like(kind)
    sae.centred = True
    x = _x()
    want, before = sae.encode(x), sae.b_enc.detach().clone()
    save_native(sae, tmp_path / "native", 0)
    export_saes({0: sae}, tmp_path / "saelens", "saelens")
    assert torch.equal(sae.b_enc, before) and sae.centred  # saving leaves the live SAE as it was
    for folder in ("native", "saelens"):
        got = load_saes(tmp_path / folder)[0]
        assert not got.centred
        assert torch.allclose(got.encode(x).dense(64), want.dense(64), atol=1e-5), folder
        assert torch.allclose(got.reconstruct(x), sae.reconstruct(x), atol=1e-5), folder
    fresh = make_sae(SAEConfig(16, 64, 4, kind=kind))
    fresh.centred = True
    fresh.init_tied(torch.Generator().manual_seed(0))
    fresh.init_b_dec(x)
    assert torch.equal(fresh.b_enc, torch.zeros(64)) and torch.allclose(fresh.b_dec, x.mean(0))
