"""inspect and contrast on the tiny Qwen3: rankings against the per-token codes, contrast figures counted by hand."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_one_line_error, random_saes, run_cli
from saescope.errors import SaescopeError
from saescope.inspect.texts import InspectConfig, contrast, inspect_texts
from saescope.models import load_model
from saescope.scope import Scope


@pytest.fixture(scope="module")
def scope(tiny_qwen3):
    return Scope(load_model(str(tiny_qwen3)), random_saes(64, [0, 2]))


def test_inspect_ranks_by_max_or_sum_and_lists_the_tokens(scope, real_texts):
    texts = real_texts[:3]
    codes = scope.encode(texts)
    for by in ("max", "sum"):
        res = inspect_texts(scope, texts, InspectConfig(top=4, by=by))
        for entry, tc in zip(res, codes):
            dense = tc.layers[2].dense(64)[1:]  # first token left out
            score = dense.amax(0) if by == "max" else dense.sum(0)
            rows = entry["layers"][2]
            assert [r["feature"] for r in rows] == score.topk(4).indices.tolist()
            assert [r["score"] for r in rows] == pytest.approx(score.topk(4).values.tolist(), abs=1e-5)
            for r in rows:
                fired = [p for p, _, _ in r["fired_on"]]
                assert fired == (dense[:, r["feature"]] > 0).nonzero()[:, 0].add(1).tolist() and 0 not in fired
    with pytest.raises(SaescopeError, match="text 1 is empty"):
        inspect_texts(scope, ["fine", "  "], InspectConfig())
    with pytest.raises(SaescopeError, match="no SAE for layer 1"):
        inspect_texts(scope, ["fine"], InspectConfig(layers=[1]))


def test_contrast_rates_are_counted_per_token_and_per_text(scope, real_texts):
    a, b = real_texts[:6], real_texts[6:10]
    res = contrast(scope, a, b, InspectConfig(layers=[0], top=64))
    fires = {name: torch.zeros(64) for name in "ab"}
    acts = {name: torch.zeros(64) for name in "ab"}
    tokens = {"a": 0, "b": 0}
    for name, texts in (("a", a), ("b", b)):
        for tc in scope.encode(texts, layers=[0]):
            dense = tc.layers[0].dense(64)[1:]
            fires[name] += (dense > 0).sum(0)
            acts[name] += dense.sum(0)
            tokens[name] += dense.shape[0]
    rows = {r["feature"]: r for r in res["layers"][0]["more_on_texts"]}
    assert len(rows) == 64
    for f, r in rows.items():
        assert r["rate"] == pytest.approx(float(fires["a"][f]) / tokens["a"])
        assert r["rate_baseline"] == pytest.approx(float(fires["b"][f]) / tokens["b"])
        assert r["mean_diff"] == pytest.approx(float(acts["a"][f]) / tokens["a"] - float(acts["b"][f]) / tokens["b"], abs=1e-5)
    diffs = [r["rate_diff"] for r in res["layers"][0]["more_on_texts"]]
    assert diffs == sorted(diffs, reverse=True)
    by_mean = contrast(scope, a, b, InspectConfig(layers=[0], top=64, rank="mean"))["layers"][0]["more_on_texts"]
    means = [r["mean_diff"] for r in by_mean]
    assert means == sorted(means, reverse=True) and {r["feature"] for r in by_mean} == set(rows)
    with pytest.raises(SaescopeError, match="unknown contrast ranking"):
        InspectConfig(rank="median")
    same = contrast(scope, a, a, InspectConfig(layers=[0], top=5))
    assert all(r["rate_diff"] == 0 for r in same["layers"][0]["more_on_texts"])


def test_long_texts_are_cut_with_a_warning(scope, real_texts):
    long = " ".join(real_texts[:40])
    with pytest.warns(UserWarning, match="cut to its first 64"):
        res = inspect_texts(scope, [long], InspectConfig(max_length=64, top=2))
    assert len(res[0]["tokens"]) == 64
    longer = " ".join(real_texts[:200])  # beyond the tiny model's 512-position context, whatever max_length says
    with pytest.warns(UserWarning, match="cut to its first 512 \\(the model's context\\)"):
        res = inspect_texts(scope, [longer], InspectConfig(max_length=100_000, top=2))
    assert len(res[0]["tokens"]) == 512


def test_inspect_cli_with_store_contrast_and_control(tiny_sae_dir, tiny_qwen3, corpus_file, tmp_path):
    code, out, err = run_cli("features", "build", "--sae", str(tiny_sae_dir), "--data", str(corpus_file), "--max-tokens", "2048",
                             "--ctx-len", "32", "--batch-size", "4", "--overwrite")
    assert code == 0, err
    assert "peak RSS" in out and (tiny_sae_dir / "features" / "store.json").exists()
    code, out, err = run_cli("inspect", "--sae", str(tiny_sae_dir), "--texts", "Natalia sold clips to 48 of her friends", "--top", "3")
    assert code == 0, err
    res = json.loads((tiny_sae_dir / "inspect" / "inspect.json").read_text())
    rows = res["texts"][0]["layers"]["1"]
    assert len(rows) == 3 and all("frequency" in r and r["contexts"] for r in rows)  # the store was found and used
    assert (tiny_sae_dir / "inspect" / "report-section-inspect.html").exists()
    code, out, err = run_cli("control", "random", "--like", str(tiny_sae_dir), "--out", str(tmp_path / "ctl"))
    assert code == 0, err
    code, out, err = run_cli("inspect", "--sae", str(tiny_sae_dir), "--texts", "mgsm_fr", "--baseline", "mgsm_en", "--limit", "20",
                             "--layers", "2", "--control", str(tmp_path / "ctl"), "--out", str(tmp_path / "c.json"))
    assert code == 0, err
    res = json.loads((tmp_path / "c.json").read_text())
    assert res["n_texts"] == 20 and res["n_baseline"] == 20 and set(res["control"]["best_rate_diff"]) == {"2"}
    assert "random control's best rate difference" in out
    # SAEs in another format with the same weights: the store still applies to them (fingerprints match)
    code, _, err = run_cli("export", "--sae", str(tiny_sae_dir), "--to", "saelens", "--out", str(tmp_path / "sl"))
    assert code == 0, err
    code, out, err = run_cli("inspect", "--sae", str(tmp_path / "sl"), "--model", str(tiny_qwen3), "--texts", "Natalia sold clips",
                             "--layers", "1", "--store", str(tiny_sae_dir / "features"), "--out", str(tmp_path / "sl.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "sl.json").read_text())["texts"][0]["layers"]["1"][0]["contexts"]


def test_inspect_cli_bad_input_is_one_line(tiny_sae_dir, tiny_qwen3, corpus_file, tmp_path):
    from saescope.inspect.store import StoreConfig, build_feature_store

    other = random_saes(64, [0, 1, 2], seed=99)
    cfg = StoreConfig(max_tokens=64, ctx_len=32, batch_size=2, data=str(corpus_file))
    build_feature_store(load_model(str(tiny_qwen3)), other, tmp_path / "other", cfg, sae_spec="other-saes", progress=False)
    cases = [(("--texts", "hello", "--store", str(tmp_path / "other")), "was built from the SAEs other-saes, not from"),
             (("--texts", ""), "text 0 is empty"),
             (("--texts", "hello", "--layers", "7"), "no SAE for layer 7"),
             (("--texts", "missing.jsonl"), "file not found: missing.jsonl"),
             (("--texts", "hello", "--control", str(tmp_path)), "use it with --baseline"),
             (("--texts", "hello", "--store", str(tmp_path)), "no feature store at")]
    for args, fragment in cases:
        code, _, err = run_cli("inspect", "--sae", str(tiny_sae_dir), *args)
        assert_one_line_error(code, err, fragment)
