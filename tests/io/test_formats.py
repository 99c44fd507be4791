import json

import pytest
import torch
from safetensors.torch import save_file

from saescope import Scope, load_saes
from saescope.core.errors import SaescopeError
from saescope.core.io import export_saes
from saescope.core.io.formats import save_native
from saescope.core.models import load_model
from saescope.core.sae import SAEConfig, TopKSAE


def _random_sae(d_model=12, d_sae=48, k=5, seed=0) -> TopKSAE:
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_model, d_sae, k))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return sae


def _reference_encode_decode(W_enc, b_enc, W_dec_rows, b_dec, k, x, subtract_b_dec=False):
    """Hand-written top-k SAE in the layout of the file under test."""
    xin = x - b_dec if subtract_b_dec else x
    pre = torch.relu(xin @ W_enc.T + b_enc)
    v, i = pre.topk(k, -1)
    z = torch.zeros_like(pre).scatter(-1, i, v)
    return z, z @ W_dec_rows + b_dec


def _same(sae: TopKSAE, z_ref, xhat_ref, x):
    code = sae.encode(x)
    assert torch.allclose(code.dense(sae.cfg.d_sae), z_ref, atol=1e-5)
    assert torch.allclose(sae.decode(code), xhat_ref, atol=1e-5)


@pytest.mark.parametrize("fmt", ["saescope", "qwen-scope", "saelens"])
def test_round_trip_every_writable_format(tmp_path, fmt):
    sae = _random_sae()
    sae.meta = {"model": "m"}
    export_saes({3: sae}, tmp_path, fmt)
    loaded = load_saes(tmp_path, k=5)
    assert list(loaded) == [3]
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded[3], name), getattr(sae, name))
    x = torch.randn(7, 12)
    z, xh = _reference_encode_decode(sae.W_enc.detach(), sae.b_enc.detach(), sae.W_dec.detach(), sae.b_dec.detach(), 5, x)
    _same(loaded[3], z, xh, x)


def test_qwen_scope_layout_and_k_from_folder_name(tmp_path):
    """A file laid out as Qwen-Scope releases it: W_dec is (d_model, d_sae)."""
    g = torch.Generator().manual_seed(1)
    W_enc, W_dec = torch.randn(48, 12, generator=g), torch.randn(12, 48, generator=g)
    b_enc, b_dec = torch.randn(48, generator=g), torch.randn(12, generator=g)
    folder = tmp_path / "SAE-Res-Tiny-W0K-L0_7"
    folder.mkdir()
    torch.save({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}, folder / "layer2.sae.pt")
    sae = load_saes(folder)[2]
    assert sae.k == 7
    x = torch.randn(5, 12)
    z, xh = _reference_encode_decode(W_enc, b_enc, W_dec.T, b_dec, 7, x)
    _same(sae, z, xh, x)


def test_sparsify_folds_b_dec(tmp_path):
    g = torch.Generator().manual_seed(2)
    W_enc, W_dec = torch.randn(48, 12, generator=g), torch.randn(48, 12, generator=g)
    b_enc, b_dec = torch.randn(48, generator=g), torch.randn(12, generator=g)
    folder = tmp_path / "layers.4"
    folder.mkdir()
    save_file({"encoder.weight": W_enc, "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 4, "normalize_decoder": True,
                                                 "num_latents": 48, "k": 6, "d_in": 12}))
    sae = load_saes(tmp_path)[4]
    x = torch.randn(9, 12)
    z, xh = _reference_encode_decode(W_enc, b_enc, W_dec, b_dec, 6, x, subtract_b_dec=True)
    _same(sae, z, xh, x)


def test_saelens_with_b_dec_applied_to_input(tmp_path):
    g = torch.Generator().manual_seed(3)
    W_enc, W_dec = torch.randn(12, 48, generator=g), torch.randn(48, 12, generator=g)
    b_enc, b_dec = torch.randn(48, generator=g), torch.randn(12, generator=g)
    save_file({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 12, "d_sae": 48, "k": 3,
                                                   "apply_b_dec_to_input": True, "metadata": {"hook_name": "model.layers.1"}}))
    sae = load_saes(tmp_path)[1]
    x = torch.randn(9, 12)
    z, xh = _reference_encode_decode(W_enc.T, b_enc, W_dec, b_dec, 3, x, subtract_b_dec=True)
    _same(sae, z, xh, x)


def test_saelens_rescale_acts_by_decoder_norm_is_folded_exactly(tmp_path):
    """sae-lens' default top-k training SAE: pre-activations times ||W_dec[i]||, decoding with unit rows."""
    g = torch.Generator().manual_seed(4)
    W_enc, W_dec = torch.randn(12, 48, generator=g), torch.randn(48, 12, generator=g) * 3
    b_enc, b_dec = torch.randn(48, generator=g), torch.randn(12, generator=g)
    save_file({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 12, "d_sae": 48, "k": 4,
                                                   "apply_b_dec_to_input": False, "rescale_acts_by_decoder_norm": True}))
    sae = load_saes(tmp_path)[0]
    x = torch.randn(9, 12)
    norm = W_dec.norm(dim=1)
    pre = torch.relu((x @ W_enc + b_enc) * norm)
    v, i = pre.topk(4, -1)
    z = torch.zeros_like(pre).scatter(-1, i, v)
    x_hat = (z / norm) @ W_dec + b_dec
    code = sae.encode(x)
    assert torch.allclose(sae.decode(code), x_hat, atol=1e-4)
    assert torch.allclose(code.dense(48), z, atol=1e-4)  # the same latents with the same values


def test_malformed_files_give_clear_errors(tmp_path):
    sae = _random_sae()
    save_native(sae, tmp_path, 0)
    data = (tmp_path / "layer0.safetensors").read_bytes()
    (tmp_path / "layer0.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SaescopeError, match="corrupt or truncated"):
        load_saes(tmp_path)
    (tmp_path / "layer0.safetensors").unlink()
    (tmp_path / "layer0.json").unlink()
    torch.save({"W_enc": torch.zeros(4, 2)}, tmp_path / "layer1.sae.pt")
    with pytest.raises(SaescopeError, match="k is not in the folder name"):
        load_saes(tmp_path)
    with pytest.raises(SaescopeError, match="expected a dict"):
        load_saes(tmp_path, k=2)
    (tmp_path / "layer1.sae.pt").write_bytes(b"\x80\x04garbage")
    with pytest.raises(SaescopeError, match="cannot read"):
        load_saes(tmp_path, k=2)
    with pytest.raises(SaescopeError, match="not found"):
        load_saes(tmp_path / "nope")


def test_shape_mismatch_is_reported(tmp_path):
    torch.save({"W_enc": torch.zeros(8, 4), "W_dec": torch.zeros(4, 8), "b_enc": torch.zeros(7), "b_dec": torch.zeros(4)},
               tmp_path / "layer0.sae.pt")
    with pytest.raises(SaescopeError, match="b_enc has shape"):
        load_saes(tmp_path, k=2)


def test_qwen_scope_checkpoint_encodes_text_from_tiny_qwen3(tmp_path, tiny_qwen3):
    """A Qwen-Scope-format file written here, loaded, and used on a tiny Qwen3: codes equal the released recipe."""
    lm = load_model(str(tiny_qwen3))
    sae = _random_sae(d_model=lm.d_model, d_sae=256, k=8, seed=4)
    folder = tmp_path / "SAE-Res-Tiny-W0K-L0_8"
    export_saes({1: sae}, folder, "qwen-scope")
    scope = Scope(lm, load_saes(folder))
    text = "Natalia sold clips to 48 of her friends in April."
    codes = scope.encode([text])[0]
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    hidden = lm.model(ids, output_hidden_states=True).hidden_states[2][0]  # = output of layer 1
    raw = torch.load(folder / "layer1.sae.pt", weights_only=True)
    z, _ = _reference_encode_decode(raw["W_enc"], raw["b_enc"], raw["W_dec"].T, raw["b_dec"], 8, hidden)
    assert torch.allclose(codes.layers[1].dense(256), z, atol=1e-4)


def test_d_model_mismatch_refused(tiny_qwen3):
    lm = load_model(str(tiny_qwen3))
    with pytest.raises(SaescopeError, match="d_model"):
        Scope(lm, {0: _random_sae(d_model=lm.d_model + 1)})
    with pytest.raises(SaescopeError, match="layers 0..2"):
        Scope(lm, {7: _random_sae(d_model=lm.d_model)})
