import pytest
import torch

from conftest import tiny_model
from saescope.core.errors import SaescopeError
from saescope.core.models import capture, decoder_layers, forward_from, layer_hooks, load_model


@pytest.mark.parametrize("fixture", ["tiny_qwen3", "tiny_qwen3_moe"])
def test_capture_is_the_decoder_layer_output(fixture, request):
    lm = load_model(str(request.getfixturevalue(fixture)))
    ids = lm.tokenizer(["Janet's ducks lay 16 eggs per day."], return_tensors="pt").input_ids
    hidden = lm.model(ids, output_hidden_states=True).hidden_states
    n = lm.n_layers
    got = capture(lm.model, ids, list(range(n)), stop_early=False)
    # hidden_states[i+1] is layer i's output, except the last one, which has the final norm applied
    for i in range(n - 1):
        assert torch.allclose(got[i], hidden[i + 1], atol=1e-6)
    assert not torch.allclose(got[n - 1], hidden[n])


def test_stop_early_skips_later_layers(tiny_qwen3):
    lm = load_model(str(tiny_qwen3))
    calls = []
    handle = decoder_layers(lm.model)[2].register_forward_hook(lambda *a: calls.append(1))
    ids = torch.tensor([[5, 6, 7, 8]])
    out = capture(lm.model, ids, [0])
    handle.remove()
    assert list(out) == [0] and calls == []


def test_layer_hooks_replace_and_restore(tiny_qwen3):
    lm = load_model(str(tiny_qwen3))
    ids = torch.tensor([[5, 6, 7, 8]])
    clean = lm.model(ids).logits
    with layer_hooks(lm.model, {1: torch.zeros_like}):
        ablated = lm.model(ids).logits
    assert not torch.allclose(clean, ablated)
    assert torch.allclose(lm.model(ids).logits, clean)  # hooks removed on exit


def test_bad_layers_and_models(tiny_qwen3, tmp_path):
    lm = load_model(str(tiny_qwen3))
    with pytest.raises(SaescopeError, match="out of range"):
        capture(lm.model, torch.tensor([[1, 2]]), [3])
    with pytest.raises(SaescopeError, match="not a model folder"):
        load_model(str(tmp_path))
    with pytest.raises(SaescopeError, match="GGUF file not found"):
        load_model(str(tmp_path / "x.gguf"))
    with pytest.raises(SaescopeError, match="cannot load model"):
        load_model("no-such-org/no-such-model-anywhere")


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen3_moe", "gemma3", "gpt2"])
def test_forward_from_a_layer_equals_the_full_forward_with_that_output(arch):
    model = tiny_model(arch).eval()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a padded row: the model's own mask must apply to the resumed layers too
    gen = torch.Generator().manual_seed(2)
    for n in range(4):
        given = torch.randn(2, 12, model.config.hidden_size if arch != "gpt2" else 32, generator=gen)
        with torch.no_grad(), layer_hooks(model, {n: lambda _h, g=given: g}):
            want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        got = forward_from(model, n, given, attention_mask=mask)
        assert torch.allclose(got, want, atol=1e-5), (arch, n, (got - want).abs().max())
    # the blocks are restored: a plain forward is the model's own again
    clean = model(input_ids=ids, use_cache=False).logits
    assert all(type(b).__name__ != "_Given" for b in decoder_layers(model))
    assert torch.allclose(model(input_ids=ids, use_cache=False).logits, clean)


def test_forward_from_refuses_a_layer_the_model_lacks(tiny_qwen3):
    lm = load_model(str(tiny_qwen3))
    with pytest.raises(SaescopeError, match="layer 3 is out of range"):
        forward_from(lm.model, 3, torch.zeros(1, 2, lm.d_model))
