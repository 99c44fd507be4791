"""saescope.core.activation_cache: `saescope cache` writes what the LM computes, resumes where it stopped and refuses a
cache of other settings; the reader gathers rows exactly and visits every token once per pass; training from a cache
or a file runs without an LM and resumes bit for bit; bad input is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_one_line_error, crash_training_at, run_cli
from saescope.core.activation_cache import CacheConfig, open_activations, read_cache_info, run_cache
from saescope.core.data import batches, iter_texts
from saescope.core.errors import SaescopeError
from saescope.core.io import load_saes
from saescope.core.models import capture, load_model
from saescope.core.train import TrainConfig, Trainer


def _cache(tiny_qwen3, text_file, out, **kw) -> CacheConfig:
    base = dict(model=str(tiny_qwen3), data=str(text_file), out=str(out), layers="0,2", max_tokens=1000, ctx_len=32,
                batch_size=4, shard_tokens=300, model_dtype="fp32")
    base.update(kw)
    return CacheConfig(**base)


def _all_rows(folder, layer) -> torch.Tensor:
    source = open_activations(folder)
    return source.rows(layer, torch.arange(source.n_tokens))


def test_the_cache_holds_the_lm_s_activations_in_order(tiny_qwen3, text_file, tmp_path):
    result = run_cache(_cache(tiny_qwen3, text_file, tmp_path / "c", dtype="fp32"))
    info = read_cache_info(tmp_path / "c")
    assert info["tokens"] == 1000 and info["complete"] and [s["tokens"] for s in info["shards"]] == [384, 384, 232]
    assert result.tokens_written == 1000 and set(info["outliers"]) == {"0", "2"}
    lm = load_model(str(tiny_qwen3), dtype="fp32")
    stream = batches(iter_texts(str(text_file)), lm.tokenizer, ctx_len=32, batch_size=4, seed=0)
    want = torch.cat([capture(lm.model, next(stream), [2])[2].reshape(-1, 64) for _ in range(8)])[:1000]
    assert torch.equal(_all_rows(tmp_path / "c", 2), want)


def test_a_cache_resumed_after_a_kill_equals_one_written_at_once(tiny_qwen3, text_file, tmp_path):
    run_cache(_cache(tiny_qwen3, text_file, tmp_path / "once"))
    run_cache(_cache(tiny_qwen3, text_file, tmp_path / "twice", max_tokens=500))
    # a writer killed after writing a shard, before cache.json named it: the stray is removed on resume
    (tmp_path / "twice" / "layer0" / "shard-000099.safetensors").write_bytes(b"partial")
    run_cache(_cache(tiny_qwen3, text_file, tmp_path / "twice"))
    assert not (tmp_path / "twice" / "layer0" / "shard-000099.safetensors").exists()
    for n in (0, 2):
        assert torch.equal(_all_rows(tmp_path / "once", n), _all_rows(tmp_path / "twice", n))


def test_a_cache_of_other_settings_is_refused_and_a_full_disk_is_refused_before_writing(tiny_qwen3, text_file, tmp_path,
                                                                                       monkeypatch):
    run_cache(_cache(tiny_qwen3, text_file, tmp_path / "c", max_tokens=300))
    with pytest.raises(SaescopeError, match="holds a cache with layers"):
        run_cache(_cache(tiny_qwen3, text_file, tmp_path / "c", layers="1"))
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6, 1000))
    with pytest.raises(SaescopeError, match="GiB free"):
        run_cache(_cache(tiny_qwen3, text_file, tmp_path / "d"))
    assert not (tmp_path / "d").exists()


def test_positions_visit_every_token_once_per_pass_in_a_seeded_order(tmp_path):
    x = np.arange(50 * 3, dtype=np.float32).reshape(50, 3)
    np.save(tmp_path / "a.npy", x)
    source = open_activations(tmp_path / "a.npy")
    assert source.layers == [0] and source.d_model == 3 and source.n_tokens == 50
    first, second = source.positions(7, 0, 50), source.positions(7, 50, 50)
    assert sorted(first.tolist()) == list(range(50)) == sorted(second.tolist())
    assert not torch.equal(first, second)
    assert torch.equal(source.positions(7, 45, 10), torch.cat([first[45:], second[:5]]))
    assert torch.equal(open_activations(tmp_path / "a.npy").positions(7, 0, 50), first)  # the order is the seed's
    idx = torch.tensor([49, 0, 17, 17])
    assert torch.equal(source.rows(0, idx), torch.from_numpy(x)[idx])


def test_activation_files_bf16_safetensors_and_bad_ones(tmp_path):
    x = torch.randn(20, 4).to(torch.bfloat16)
    save_file({"activations": x}, str(tmp_path / "a.safetensors"))
    assert torch.equal(open_activations(tmp_path / "a.safetensors", layer=5).rows(5, torch.arange(20)), x.float())
    cases = {"rank.npy": (np.zeros((2, 3, 4), np.float32), "must be (n_tokens, d_model)"),
             "int.npy": (np.zeros((5, 4), np.int64), "float32 or float16")}
    for name, (arr, fragment) in cases.items():
        np.save(tmp_path / name, arr)
        with pytest.raises(SaescopeError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            open_activations(tmp_path / name)
    save_file({"acts": x}, str(tmp_path / "named.safetensors"))
    with pytest.raises(SaescopeError, match="no tensor named 'activations'"):
        open_activations(tmp_path / "named.safetensors")
    save_file({"activations": torch.zeros(3, 4, 2)}, str(tmp_path / "r3.safetensors"))
    with pytest.raises(SaescopeError, match="must be \\(n_tokens, d_model\\)"):
        open_activations(tmp_path / "r3.safetensors")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(SaescopeError, match="give a cache folder"):
        open_activations(tmp_path / "a.txt")
    with pytest.raises(SaescopeError, match="not an activation cache"):
        open_activations(tmp_path)


def _train(source, out, **kw) -> TrainConfig:
    base = dict(activations=str(source), out=str(out), preset=None, expansion=4, k=8, ctx_len=32, batch_size=4,
                max_tokens=32 * 4 * 12, checkpoint_every=4, log_every=1, lr=2e-3)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "matryoshka"])
def test_training_from_a_cache_resumes_bit_for_bit(tiny_qwen3, text_file, tmp_path, monkeypatch, arch):
    run_cache(_cache(tiny_qwen3, text_file, tmp_path / "c", max_tokens=800))  # 1536 training tokens: two passes
    Trainer(_train(tmp_path / "c", tmp_path / "straight", arch=arch)).fit()
    crash_training_at(monkeypatch, 6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(_train(tmp_path / "c", tmp_path / "crashed", arch=arch)).fit()
    monkeypatch.undo()
    resumed = Trainer(_train(tmp_path / "c", tmp_path / "crashed", arch=arch))
    assert resumed.lm is None and resumed.load_checkpoint() and resumed.step == 4
    resumed.fit()
    want, got = load_saes(tmp_path / "straight"), load_saes(tmp_path / "crashed")
    assert sorted(got) == [0, 2] and got[0].cfg.kind == arch
    for n in want:
        for name, t in {**{p: getattr(want[n], p) for p in ("W_enc", "b_enc", "W_dec", "b_dec")},
                        **want[n].extra_tensors()}.items():
            other = getattr(got[n], name) if name in ("W_enc", "b_enc", "W_dec", "b_dec") else got[n].extra_tensors()[name]
            assert torch.equal(other, t), (n, name)
    saved = json.loads((tmp_path / "straight" / "train.json").read_text())
    assert saved["model"] == str(tiny_qwen3) and saved["arch"] == arch and saved["data"] == str(text_file)
    log = [json.loads(line) for line in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()]
    assert min(r["layers"]["0"]["fvu"] for r in log[1:]) < log[0]["layers"]["0"]["fvu"]  # it learns (12 short steps)


def test_training_from_a_file_and_what_a_cache_cannot_give(tiny_qwen3, text_file, tmp_path):
    np.save(tmp_path / "a.npy", np.random.default_rng(0).standard_normal((600, 64)).astype(np.float32))
    summary = Trainer(_train(tmp_path / "a.npy", tmp_path / "f", layers="7", max_tokens=1024)).fit()
    assert summary["steps"] == 8 and list(load_saes(tmp_path / "f")) == [7]
    with pytest.raises(SaescopeError, match="holds one layer's activations"):
        Trainer(_train(tmp_path / "a.npy", tmp_path / "g", layers="1,2"))
    run_cache(_cache(tiny_qwen3, text_file, tmp_path / "c", max_tokens=300))
    with pytest.raises(SaescopeError, match="holds layers 0,2, not layer 1"):
        Trainer(_train(tmp_path / "c", tmp_path / "h", layers="1"))
    with pytest.raises(SaescopeError, match="caches .*, not other-model"):
        Trainer(_train(tmp_path / "c", tmp_path / "h", model="other-model"))
    with pytest.raises(SaescopeError, match="kept every sequence's first token"):
        Trainer(_train(tmp_path / "c", tmp_path / "h", skip_first_token=True))
    with pytest.raises(SaescopeError, match="l0_coef"):
        _train(tmp_path / "c", tmp_path / "h", l0_coef=2.0)


def test_cache_and_train_command_lines_refuse_bad_input_in_one_line(tiny_qwen3, tmp_path):
    np.save(tmp_path / "r.npy", np.zeros((2, 3, 4), np.float32))
    code, _, err = run_cli("train", "--activations", str(tmp_path / "r.npy"), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "must be (n_tokens, d_model)")
    assert not (tmp_path / "o").exists()
    code, _, err = run_cli("train", "--activations", str(tmp_path / "r.npy"), "--arch", "topk", "--l0-coef", "1",
                           "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "--l0-coef is the weight of jumprelu's L0 loss")
    code, _, err = run_cli("train", "--arch", "gated", "--out", str(tmp_path / "o"))
    assert code == 2 and "invalid choice" in err
    code, _, err = run_cli("cache", "--model", str(tiny_qwen3), "--layers", "9", "--out", str(tmp_path / "c"))
    assert_one_line_error(code, err, "layer 9 is out of range")
    assert not (tmp_path / "c").exists()
