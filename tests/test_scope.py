import pytest
import torch

from saescope import SaescopeError, Scope
from saescope.core.models import capture, load_model
from saescope.core.sae import SAEConfig, TopKSAE


@pytest.fixture()
def scope(tiny_qwen3):
    lm = load_model(str(tiny_qwen3))
    saes = {}
    for n in (0, 2):
        sae = TopKSAE(SAEConfig(lm.d_model, 128, 4))
        sae.init_tied(torch.Generator().manual_seed(n))
        saes[n] = sae
    return Scope(lm, saes)


def test_encode_per_token_codes_match_direct_encoding(scope, real_texts):
    texts = real_texts[:5]
    codes = scope.encode(texts, batch_size=2)
    assert len(codes) == 5
    for text, tc in zip(texts, codes):
        ids = scope.lm.tokenizer(text, return_tensors="pt").input_ids
        assert tc.input_ids.tolist() == ids[0].tolist() and len(tc.tokens) == ids.shape[1]
        hidden = scope.lm.model(ids, output_hidden_states=True).hidden_states[1][0]  # layer 0 output
        want = scope.saes[0].encode(hidden).dense(128)
        assert torch.allclose(tc.layers[0].dense(128), want, atol=1e-5)  # padding in the batch changes nothing


def test_pooled_max_mean_and_last(scope, real_texts):
    texts = real_texts[:9]  # batches of 4 sorted by length: results must come back in the texts' order
    mx = scope.pooled(texts, layer=2, pool="max", batch_size=4)
    mx_skip = scope.pooled(texts, layer=2, pool="max", batch_size=4, skip_first_token=True)
    mean_skip = scope.pooled(texts, layer=2, pool="mean", batch_size=4, skip_first_token=True)
    last = scope.pooled(texts, layer=2, pool="last", batch_size=4)
    residual, both = {}, {}
    for idx, got in scope.iter_pooled(texts, layers=[2], pool="mean", batch_size=4, with_residual=True, progress=False):
        residual.update(zip(idx, got["residual"][2]))
    for idx, got in scope.iter_pooled(texts, layers=[2], pool="max+mean", batch_size=4, skip_first_token=True,
                                      progress=False):  # no residual asked for: its pooling is not checked
        both.update(zip(idx, got["sae"][2].unbind(1)))  # (2, batch, d_sae): max, then mean, of one encoding
    codes = scope.encode(texts, layers=[2])
    for i, tc in enumerate(codes):
        dense = tc.layers[2].dense(128)
        assert torch.allclose(mx[i], dense.max(0).values, atol=1e-5) and torch.allclose(last[i], dense[-1], atol=1e-5)
        assert torch.allclose(mx_skip[i], dense[1:].max(0).values, atol=1e-5)
        assert torch.allclose(mean_skip[i], dense[1:].mean(0), atol=1e-5)
        assert torch.equal(both[i][0], mx_skip[i]) and torch.equal(both[i][1], mean_skip[i])
        ids = scope.lm.tokenizer(texts[i], return_tensors="pt").input_ids
        hidden = capture(scope.lm.model, ids, [2])[2][0]  # layer 2's output (the last layer: hidden_states is normed)
        assert torch.allclose(residual[i], hidden.mean(0), atol=1e-4)  # padding changes nothing
    with pytest.raises(SaescopeError, match="pooling"):
        scope.pooled(texts, layer=2, pool="median")
    with pytest.raises(SaescopeError, match="pooling of the residual"):
        next(scope.iter_pooled(texts, layers=[2], pool="max+mean", with_residual=True, progress=False))
    with pytest.raises(SaescopeError, match="text 1 .* is empty"):
        scope.pooled([texts[0], ""], layer=2, pool="last")


def test_pre_activations_carry_gradients_into_the_model(scope):
    ids = torch.tensor([[5, 9, 13, 21]])
    scope.lm.model.requires_grad_(True)
    pre = scope.pre_activations(ids, layer=2, latents=[1, 7])
    assert pre.shape == (1, 4, 2)
    torch.relu(pre).sum().backward()
    grads = [p.grad for p in scope.lm.model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    scope.lm.model.requires_grad_(False)
    with pytest.raises(SaescopeError, match="out of range"):
        scope.pre_activations(ids, layer=2, latents=[128])


def test_direction_is_a_unit_decoder_row(scope):
    d = scope.direction(layer=0, feature=3)
    assert torch.allclose(d.norm(), torch.tensor(1.0), atol=1e-5)
    with pytest.raises(SaescopeError):
        scope.direction(layer=0, feature=999)


def test_load_refuses_to_guess_the_model(tmp_path):
    from conftest import random_saes, save_saes

    save_saes(random_saes(64, [0], model=""), tmp_path)
    with pytest.raises(SaescopeError, match="do not name their model: give model"):
        Scope.load(str(tmp_path))
