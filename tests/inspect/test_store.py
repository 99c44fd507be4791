"""The feature store: every statistic against a brute-force recomputation, resume, lazy reads, refusals,
and MoE routing checked against the routers' own outputs."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_one_line_error, random_saes, run_cli
from saescope.api.store import (
    FORMAT,
    HIST_EDGES,
    VERSION,
    FeatureStore,
    LayerStats,
    StoreConfig,
    _settings,
    build_feature_store,
    expert_features,
)
from saescope.cli import main
from saescope.core.activations import OutlierFilter
from saescope.core.data import batches, iter_texts
from saescope.core.errors import SaescopeError
from saescope.core.models import capture, load_model, record_routing
from saescope.core.sae import SparseCode


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(2, 9), st.integers(1, 3), st.integers(0, 10_000), st.integers(1, 3))
def test_layer_stats_match_brute_force(B, T, k, seed, n_batches):
    g = torch.Generator().manual_seed(seed)
    d, cfg = 6, StoreConfig(top_n=3, left=2, right=1)
    stats = LayerStats(d, cfg, torch.device("cpu"))
    seq_maxima = []  # (act, feature, window) of every (sequence, feature) with a firing
    fire = torch.zeros(d, dtype=torch.int64)
    act = torch.zeros(d, dtype=torch.float64)
    for b in range(n_batches):
        ids = torch.randint(0, 50, (B, T), generator=g)
        idx = torch.stack([torch.randperm(d, generator=g)[:k] for _ in range(B * T)])
        val = torch.rand(B * T, k, generator=g) * 4 - 1  # some values <= 0: not firing
        keep = torch.rand(B * T, generator=g) > 0.2
        stats.update(ids, SparseCode(idx, val), keep, b * B)
        v = torch.where(keep[:, None] & (val > 0), val, torch.zeros(()))
        for t in range(B * T):
            for j in range(k):
                if v[t, j] > 0:
                    fire[idx[t, j]] += 1
                    act[idx[t, j]] += float(v[t, j])
        dense = torch.zeros(B * T, d).scatter_(1, idx, v).reshape(B, T, d)
        for s in range(B):
            for f in range(d):
                m, p = dense[s, :, f].max(0)
                if m > 0:
                    window = [int(ids[s, q]) if 0 <= q < T else -1 for q in range(int(p) - 2, int(p) + 2)]
                    seq_maxima.append((float(m), f, window))
    assert torch.equal(stats.t["fire_count"], fire)
    assert torch.allclose(stats.t["act_sum"], act)
    assert int(stats.t["hist"].sum()) == int(fire.sum()) and torch.equal(stats.t["hist"].sum(1), fire)
    for f in range(d):
        want = sorted((m for m, ff, _ in seq_maxima if ff == f), reverse=True)[:3]
        got = [a for a in stats.t["top_acts"][f].tolist() if a > 0]
        assert got == pytest.approx(want)
        for a, w in zip(stats.t["top_acts"][f].tolist(), stats.t["top_tokens"][f].tolist()):
            if a > 0:  # the window is the one around the max token of that sequence
                assert any(abs(a - m) < 1e-6 and w == win for m, ff, win in seq_maxima if ff == f)


def test_histogram_bins_are_log_spaced_with_open_ends():
    stats = LayerStats(1, StoreConfig(), torch.device("cpu"))
    vals = torch.tensor([[1e-5, 0.0015, 1.0, 5e4]])
    code = SparseCode(torch.zeros(1, 4, dtype=torch.long), vals)
    stats.update(torch.zeros(1, 1, dtype=torch.long), code, torch.ones(1, dtype=torch.bool), 0)
    hist = stats.t["hist"][0]
    assert len(HIST_EDGES) == 49 and HIST_EDGES[0] == 1e-3 and HIST_EDGES[-1] == 1e3
    assert hist[0] == 1 and hist[1] == 1 and hist[-1] == 1  # below 1e-3 -> first bin, above 1e3 -> last
    assert hist[24] == 1  # 1.0 sits at the left edge of bin 24 (8 bins per decade from 1e-3)


@pytest.fixture(scope="module")
def lm(tiny_qwen3):
    return load_model(str(tiny_qwen3))


@torch.no_grad()
def test_build_matches_direct_encoding_and_reads_lazily(lm, corpus_file, tmp_path):
    saes = random_saes(64, [0, 2], model="tiny")
    cfg = StoreConfig(max_tokens=4 * 4 * 32, ctx_len=32, batch_size=4, top_n=5, data=str(corpus_file))
    build_feature_store(lm, saes, tmp_path / "fs", cfg, sae_spec="tiny-saes", progress=False)
    store = FeatureStore(tmp_path / "fs")
    assert store.layers == [0, 2] and store.meta["tokens"] == 512 and store.meta["moe"] is None
    fire = {n: torch.zeros(64, dtype=torch.int64) for n in (0, 2)}
    best = {n: torch.zeros(64) for n in (0, 2)}
    kept = {n: 0 for n in (0, 2)}
    filters = {n: OutlierFilter(5.0) for n in (0, 2)}
    stream = batches(iter_texts(str(corpus_file), split="train"), lm.tokenizer, ctx_len=32, batch_size=4, seed=0)
    for _, ids in zip(range(4), stream):
        acts = capture(lm.model, ids, [0, 2])
        for n in (0, 2):
            x = acts[n].reshape(-1, 64)
            keep = filters[n].keep(x)
            dense = saes[n].encode(x).dense(64) * keep[:, None]
            fire[n] += (dense > 0).sum(0)
            best[n] = torch.maximum(best[n], dense.amax(0))
            kept[n] += int(keep.sum())
    for n in (0, 2):
        assert torch.equal(store.tensor(n, "fire_count"), fire[n])
        assert torch.allclose(store.tensor(n, "top_acts")[:, 0], best[n], atol=1e-5)
        assert store.n_tokens(n) == kept[n]
        f = int(fire[n].argmax())
        info = store.feature(n, f)
        assert info["fire_count"] == int(fire[n][f]) and info["frequency"] == pytest.approx(int(fire[n][f]) / kept[n])
        assert len(info["contexts"]) == 5 and info["contexts"][0]["activation"] == pytest.approx(float(best[n][f]), abs=1e-5)
        assert all(len(c["tokens"]) == 17 and c["mark"] == 12 for c in info["contexts"])
        # logit lens: the promoted tokens are the top logits of the decoder row through norm + unembedding
        logits = lm.model.lm_head(lm.model.model.norm(saes[n].W_dec[f].detach()))
        top = logits.topk(10).indices.tolist()
        assert [t for t, _ in info["promoted"]] == [store.token(i) for i in top]
        assert store.tensor(n, "top_acts", slice(f, f + 1)).shape == (1, 5)  # a row, not the whole tensor
    with pytest.raises(SaescopeError, match="feature 64 does not exist: layer 0 has features 0..63"):
        store.feature(0, 64)
    with pytest.raises(SaescopeError, match="has no layer 1"):
        store.feature(1, 0)
    other = random_saes(64, [0, 2], seed=99)
    with pytest.raises(SaescopeError, match="built from the SAEs tiny-saes, not from other-saes"):
        store.check_matches(other, "other-saes")
    store.check_matches(saes, "tiny-saes")
    with pytest.raises(SaescopeError, match="already holds a feature store"):
        build_feature_store(lm, saes, tmp_path / "fs", cfg, sae_spec="tiny-saes", progress=False)


def test_interrupted_build_resumes_to_the_same_store(lm, corpus_file, tmp_path, monkeypatch):
    saes = random_saes(64, [1], model="tiny")
    cfg = StoreConfig(max_tokens=6 * 2 * 32, ctx_len=32, batch_size=2, top_n=4, checkpoint_every=2, data=str(corpus_file))
    build_feature_store(lm, saes, tmp_path / "whole", cfg, sae_spec="s", progress=False)
    calls = {"n": 0}
    real_update = LayerStats.update

    def dying_update(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # batches 0-3 done, checkpoint at 4 written; killed inside batch 5
            raise KeyboardInterrupt
        return real_update(self, *a, **kw)

    monkeypatch.setattr(LayerStats, "update", dying_update)
    with pytest.raises(KeyboardInterrupt):
        build_feature_store(lm, saes, tmp_path / "cut", cfg, sae_spec="s", progress=False)
    monkeypatch.setattr(LayerStats, "update", real_update)
    assert (tmp_path / "cut" / "partial" / "layer1-b4.safetensors").exists() and not (tmp_path / "cut" / "store.json").exists()
    build_feature_store(lm, saes, tmp_path / "cut", cfg, sae_spec="s", resume=True, progress=False)
    a, b = FeatureStore(tmp_path / "whole"), FeatureStore(tmp_path / "cut")
    for name in ("fire_count", "act_sum", "hist", "top_acts", "top_tokens", "top_source", "logit_top_ids"):
        assert torch.equal(a.tensor(1, name), b.tensor(1, name)), name
    assert not (tmp_path / "cut" / "partial").exists()


def test_store_errors_are_one_line(tmp_path):
    with pytest.raises(SaescopeError, match="no feature store at"):
        FeatureStore(tmp_path)
    with pytest.raises(SaescopeError, match="max_tokens must be >= 1"):
        StoreConfig(max_tokens=0)


@torch.no_grad()
def test_moe_routing_counts_equal_the_routers_own_choices(tiny_qwen3_moe, corpus_file, tmp_path):
    lm = load_model(str(tiny_qwen3_moe))
    ids = torch.randint(0, 500, (3, 16), generator=torch.Generator().manual_seed(0))
    with record_routing(lm.model, [0, 1]) as routes:
        out = lm.model(input_ids=ids, output_router_logits=True)
    assert set(routes) == {0, 1}
    for n in (0, 1):
        want = out.router_logits[n].reshape(-1, 8).topk(2, dim=-1).indices
        assert torch.equal(routes[n].sort(dim=1).values, want.sort(dim=1).values)
        assert torch.equal(torch.bincount(routes[n].flatten(), minlength=8), torch.bincount(want.flatten(), minlength=8))

    saes = random_saes(64, [0, 1], model="moe")
    cfg = StoreConfig(max_tokens=3 * 2 * 32, ctx_len=32, batch_size=2, top_n=3, data=str(corpus_file))
    build_feature_store(lm, saes, tmp_path / "fs", cfg, sae_spec="moe", progress=False)
    store = FeatureStore(tmp_path / "fs")
    assert store.meta["moe"] == {"n_experts": 8, "experts_per_token": 2}
    counts = torch.zeros(64, 8, dtype=torch.int64)
    tokens = torch.zeros(8, dtype=torch.int64)
    norm_filter = OutlierFilter(5.0)
    stream = batches(iter_texts(str(corpus_file), split="train"), lm.tokenizer, ctx_len=32, batch_size=2, seed=0)
    for _, ids in zip(range(3), stream):
        with record_routing(lm.model, [1]) as routes:
            x = capture(lm.model, ids, [1])[1].reshape(-1, 64)
        keep = norm_filter.keep(x)
        dense = saes[1].encode(x).dense(64) * keep[:, None]
        for t in range(x.shape[0]):
            if keep[t]:
                tokens[routes[1][t]] += 1
            for f in (dense[t] > 0).nonzero()[:, 0].tolist():
                counts[f, routes[1][t]] += 1
    assert torch.equal(store.tensor(1, "expert_counts"), counts)
    assert torch.equal(store.tensor(1, "expert_tokens"), tokens)
    f = int(counts.sum(1).argmax())
    prof = store.feature(1, f)["experts"]
    share = counts[f].double() / counts[f].sum()
    assert prof["distribution"] == pytest.approx(share.tolist())
    nz = share[share > 0]
    assert prof["entropy_bits"] == pytest.approx(float(-(nz * nz.log2()).sum())) and prof["max_entropy_bits"] == math.log2(8)
    per_expert = expert_features(store, 1, top=3, min_count=1)
    assert len(per_expert) == 8 and abs(sum(e["token_share"] for e in per_expert) - 1) < 1e-9
    code, out, err = run_cli("features", "experts", "--store", str(tmp_path / "fs"), "--layer", "1", "--top", "3")
    assert code == 0 and out.count("expert ") == 8, err
    code, out, err = run_cli("features", "show", "--store", str(tmp_path / "fs"), "--layer", "1", "--feature", str(f))
    assert code == 0 and f"entropy {prof['entropy_bits']:.2f} of 3.00 bits" in out, err


def _hand_store(path: Path, d: int = 8) -> Path:
    """A small valid store written by hand: LayerStats' own tensors and the store.json the builder writes."""
    cfg = StoreConfig(top_n=3, left=2, right=1, logit_k=2)
    stats = LayerStats(d, cfg, torch.device("cpu"))
    stats.t["fire_count"][3] = 5
    ids, vals = torch.zeros(d, 2, dtype=torch.int32), torch.ones(d, 2)
    stats.t.update(logit_top_ids=ids, logit_top_vals=vals, logit_bottom_ids=ids.clone(), logit_bottom_vals=-vals)
    path.mkdir()
    (path / "layer0.safetensors").write_bytes(stats.to_bytes())
    (path / "tokens.json").write_text('{"0": "the"}')
    (path / "store.json").write_text(json.dumps({
        "format": FORMAT, "version": VERSION, "sae": "s", "model": "m", "layers": [0], "fingerprints": {}, "d_sae": {"0": d},
        "config": asdict(cfg), "hist_edges": HIST_EDGES, "moe": None, "batches": 1, "tokens": 100, "counted_tokens": {"0": 90},
        "build": {"seconds": 1.0, "peak_rss_mb": 100, "device": "cpu"}}))
    return path


def test_damaged_stores_are_one_line_errors_naming_the_file(tmp_path, capsys):
    fs = _hand_store(tmp_path / "fs")
    info = FeatureStore(fs).feature(0, 3)
    assert info["fire_count"] == 5 and info["promoted"] == [["the", 1.0], ["the", 1.0]]
    meta = json.loads((fs / "store.json").read_text())
    cases = {"{": "store.json: not valid JSON", "[]": "store.json is not a saescope feature store",
             json.dumps({**meta, "layers": ["0"]}): "field 'layers' must list layer numbers",
             json.dumps({**meta, "d_sae": {}}): "field 'd_sae' has no integer >= 1 for layer 0",
             json.dumps({**meta, "counted_tokens": {"0": -1}}): "field 'counted_tokens' has no integer >= 0 for layer 0",
             json.dumps({**meta, "config": {**meta["config"], "left": "2"}}): "store.json: config: field 'left' must be an integer",
             json.dumps({k: v for k, v in meta.items() if k != "hist_edges"}): "field 'hist_edges' is missing"}
    for text, msg in cases.items():
        (fs / "store.json").write_text(text)
        with pytest.raises(SaescopeError, match=msg) as exc:
            FeatureStore(fs)
        assert str(fs / "store.json") in str(exc.value)
    (fs / "store.json").write_text(json.dumps({**meta, "d_sae": {"0": 16}}))  # more features than the tensors hold
    with pytest.raises(SaescopeError, match="layer0.safetensors: fire_count has shape \\[8\\], store.json implies \\[16\\]"):
        FeatureStore(fs).feature(0, 12)
    (fs / "store.json").write_text(json.dumps(meta))
    layer = fs / "layer0.safetensors"
    good = layer.read_bytes()
    layer.write_bytes(good[: len(good) // 2])
    with pytest.raises(SaescopeError, match="cannot read .*layer0.safetensors: missing, corrupt or truncated"):
        FeatureStore(fs).feature(0, 3)
    layer.unlink()
    with pytest.raises(SaescopeError, match="cannot read .*layer0.safetensors: missing, corrupt or truncated"):
        FeatureStore(fs).frequencies(0)
    layer.write_bytes(good)
    (fs / "tokens.json").write_text('["the"]')
    with pytest.raises(SaescopeError, match="tokens.json: expected an object"):
        FeatureStore(fs).feature(0, 3)
    (fs / "tokens.json").write_text('{"0": "the"}')
    # the command line: a feature out of range is one line, whichever side of the range
    for feature, msg in (("8", "feature 8 does not exist: layer 0 has features 0..7"), ("-1", "--feature must be >= 0")):
        code = main(["features", "show", "--store", str(fs), "--layer", "0", "--feature", feature])
        assert_one_line_error(code, capsys.readouterr().err, msg)


def test_resume_refuses_a_damaged_checkpoint_and_keeps_it(lm, tmp_path):
    saes = random_saes(64, [1], model="tiny")
    cfg = StoreConfig(max_tokens=4 * 2 * 32, ctx_len=32, batch_size=2, top_n=4, checkpoint_every=2)
    partial = tmp_path / "fs" / "partial"
    partial.mkdir(parents=True)
    settings = {**_settings(cfg, "s", lm, saes), "moe": None}
    ckpt = partial / "layer1-b2.safetensors"
    cases = [("{", "progress.json: not valid JSON"),
             (json.dumps({"batches": "2", "settings": settings}), "field 'batches' must be an integer"),
             (json.dumps({"batches": 9, "settings": settings}), "field 'batches' must be <= 4"),
             (json.dumps({"batches": 2, "settings": []}), "field 'settings' must be an object"),
             (json.dumps({"batches": 2, "settings": settings}), "cannot read .*layer1-b2.safetensors: missing, corrupt or truncated")]
    for text, msg in cases:
        (partial / "progress.json").write_text(text)
        with pytest.raises(SaescopeError, match=f"{msg}.*; start again without resume"):
            build_feature_store(lm, saes, tmp_path / "fs", cfg, sae_spec="s", resume=True, progress=False)
    ckpt.write_bytes(LayerStats(64, StoreConfig(top_n=3), torch.device("cpu")).checkpoint_bytes())  # other sizes
    with pytest.raises(SaescopeError, match="b2.safetensors: top_\\w+ is torch.\\w+ \\[64, 3\\], expected torch.\\w+ \\[64, 4\\]"):
        build_feature_store(lm, saes, tmp_path / "fs", cfg, sae_spec="s", resume=True, progress=False)
    ckpt.write_bytes(LayerStats(64, cfg, torch.device("cpu")).to_bytes())  # a store file, not a checkpoint: no filter state
    with pytest.raises(SaescopeError, match="b2.safetensors holds .*expected .*'outlier_count', 'outlier_medians'"):
        build_feature_store(lm, saes, tmp_path / "fs", cfg, sae_spec="s", resume=True, progress=False)
    assert ckpt.exists() and (partial / "progress.json").exists()  # refused, not cleared: the user decides


def test_values_no_build_produces_are_one_line_errors_naming_the_file_and_tensor(tmp_path, capsys):
    from safetensors.torch import load_file, save

    fs = _hand_store(tmp_path / "fs")
    layer = fs / "layer0.safetensors"
    good = {k: v.clone() for k, v in load_file(layer).items()}  # not views of the file rewritten below
    cases = [("fire_count", lambda t: t.__setitem__(3, -4), "fire_count holds a negative count \\(-4\\)"),
             ("fire_count", lambda t: t.__setitem__(3, 91), "fire_count holds a count of 91 tokens, above the 90 tokens"),
             ("act_sum", lambda t: t.__setitem__(3, float("nan")), "act_sum holds a value that is not a finite number"),
             ("top_tokens", lambda t: t.__setitem__((3, 0, 0), 1_000_000_000), "top_tokens holds token id 1000000000"),
             ("top_tokens", lambda t: t.__setitem__((3, 0, 0), -7), "top_tokens holds token id -7"),
             ("logit_top_ids", lambda t: t.__setitem__((3, 0), 5), "logit_top_ids holds token id 5")]
    for name, damage, msg in cases:
        tensors = {k: v.clone() for k, v in good.items()}
        tensors["top_acts"][3, 0] = 1.0  # one context to show
        damage(tensors[name])
        layer.write_bytes(save(tensors))
        with pytest.raises(SaescopeError, match=msg) as exc:
            FeatureStore(fs).feature(0, 3)
        assert str(layer) in str(exc.value) and "\n" not in str(exc.value)
        code = main(["features", "show", "--store", str(fs), "--layer", "0", "--feature", "3"])
        assert_one_line_error(code, capsys.readouterr().err, f"layer0.safetensors: {name} holds")
    layer.write_bytes(save(good))
    meta = json.loads((fs / "store.json").read_text())
    (fs / "store.json").write_text(json.dumps({**meta, "counted_tokens": {"0": 0}}))  # 5 firings of 0 tokens
    with pytest.raises(SaescopeError, match="fire_count holds a count of 5 tokens, above the 0 tokens counted for layer 0"):
        FeatureStore(fs).feature(0, 3)


@pytest.mark.parametrize("screen", [False, True])
def test_logit_lens_ranks_tokens_as_the_full_unembedding_does(tiny_qwen3, screen):
    """The k tokens each direction promotes and suppresses, in order, with their logits: the plain path and the bf16
    screen + fp32 ranking (forced here; on by itself on CPUs with fast bf16) against unembed + torch.topk."""
    from unittest.mock import patch

    from saescope.api.store import logit_lens
    from saescope.core.models import unembed

    lm = load_model(str(tiny_qwen3))
    directions = torch.randn(40, lm.d_model, generator=torch.Generator().manual_seed(0))
    with patch("saescope.api.store.screens", return_value=screen):
        top_ids, top_vals, bottom_ids, bottom_vals = logit_lens(lm.model, directions, 7, chunk=16)  # several chunks
    with torch.no_grad():
        logits = unembed(lm.model, directions).float()
    want_top, want_bottom = logits.topk(7, dim=1), (-logits).topk(7, dim=1)
    torch.testing.assert_close(top_vals, want_top.values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bottom_vals, -want_bottom.values, atol=1e-5, rtol=1e-5)
    assert top_ids.dtype == torch.int32 and torch.equal(top_ids.long(), want_top.indices)
    assert torch.equal(bottom_ids.long(), want_bottom.indices)
