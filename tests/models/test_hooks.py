import pytest
import torch

from saescope.errors import SaescopeError
from saescope.models import capture, decoder_layers, layer_hooks, load_model


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
