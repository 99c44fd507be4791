"""inspect and contrast on the tiny Qwen3: rankings against the per-token codes, contrast figures counted by hand."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_one_line_error, random_saes, run_cli
from saescope import cli
from saescope.api.scope import Scope
from saescope.apps.inspect.run import texts_of
from saescope.apps.inspect.texts import ReadingConfig, contrast, inspect_texts
from saescope.core.errors import SaescopeError
from saescope.core.models import load_model


@pytest.fixture(scope="module")
def scope(tiny_qwen3):
    return Scope(load_model(str(tiny_qwen3)), random_saes(64, [0, 2]))


def test_inspect_ranks_by_max_or_sum_and_lists_the_tokens(scope, real_texts):
    texts = real_texts[:3]
    codes = scope.encode(texts)
    for by in ("max", "sum"):
        res = inspect_texts(scope, texts, ReadingConfig(top=4, by=by))
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
        inspect_texts(scope, ["fine", "  "], ReadingConfig())
    with pytest.raises(SaescopeError, match="no SAE for layer 1"):
        inspect_texts(scope, ["fine"], ReadingConfig(layers=[1]))


def test_contrast_rates_are_counted_per_token_and_per_text(scope, real_texts):
    a, b = real_texts[:6], real_texts[6:10]
    res = contrast(scope, a, b, ReadingConfig(layers=[0], top=64))
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
    by_mean = contrast(scope, a, b, ReadingConfig(layers=[0], top=64, rank="mean"))["layers"][0]["more_on_texts"]
    means = [r["mean_diff"] for r in by_mean]
    assert means == sorted(means, reverse=True) and {r["feature"] for r in by_mean} == set(rows)
    with pytest.raises(SaescopeError, match="rank must be one of rate, mean"):
        ReadingConfig(rank="median")
    same = contrast(scope, a, a, ReadingConfig(layers=[0], top=5))
    assert all(r["rate_diff"] == 0 for r in same["layers"][0]["more_on_texts"])


def test_long_texts_are_cut_with_a_warning(scope, real_texts):
    long = " ".join(real_texts[:40])
    with pytest.warns(UserWarning, match="cut to its first 64"):
        res = inspect_texts(scope, [long], ReadingConfig(max_length=64, top=2))
    assert len(res[0]["tokens"]) == 64
    longer = " ".join(real_texts[:200])  # beyond the tiny model's 512-position context, whatever max_length says
    with pytest.warns(UserWarning, match="cut to its first 512 tokens \\(the model's context\\)"):
        res = inspect_texts(scope, [longer], ReadingConfig(max_length=100_000, top=2))
    assert len(res[0]["tokens"]) == 512
    with pytest.warns(UserWarning, match="^2 of 3 texts \\(up to \\d+ tokens\\) were cut to their first 64 tokens") as got:
        inspect_texts(scope, [long, "short", long], ReadingConfig(max_length=64, top=2))
    assert len([w for w in got if "cut to" in str(w.message)]) == 1  # one warning for the set
    with pytest.warns(UserWarning, match="^2 of 3 texts") as got:  # also when the set spans several batches
        codes = scope.encode([long, "short", long], max_length=64, batch_size=1, progress=False)
    assert len([w for w in got if "cut to" in str(w.message)]) == 1 and [len(c.input_ids) for c in codes][::2] == [64, 64]


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
    assert "random control's best rate difference" in out and res["control"]["kind"] == "random"
    # SAEs in another format with the same weights: the store still applies to them (fingerprints match)
    code, _, err = run_cli("export", "--sae", str(tiny_sae_dir), "--to", "saelens", "--out", str(tmp_path / "sl"))
    assert code == 0, err
    code, out, err = run_cli("inspect", "--sae", str(tmp_path / "sl"), "--model", str(tiny_qwen3), "--texts", "Natalia sold clips",
                             "--layers", "1", "--store", str(tiny_sae_dir / "features"), "--out", str(tmp_path / "sl.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "sl.json").read_text())["texts"][0]["layers"]["1"][0]["contexts"]


def test_inspect_cli_bad_input_is_one_line(tiny_sae_dir, tiny_qwen3, corpus_file, tmp_path):
    from saescope.api.store import StoreConfig, build_feature_store

    other = random_saes(64, [0, 1, 2], seed=99)
    cfg = StoreConfig(max_tokens=64, ctx_len=32, batch_size=2, data=str(corpus_file))
    build_feature_store(load_model(str(tiny_qwen3)), other, tmp_path / "other", cfg, sae_spec="other-saes", progress=False)
    cases = [(("--texts", "hello", "--store", str(tmp_path / "other")), "was built from the SAEs other-saes, not from"),
             (("--texts", ""), "text 0 is empty"),
             (("--texts", "hello", "--layers", "7"), "no SAE for layer 7"),
             (("--texts", "missing.jsonl"), "no such file: missing.jsonl"),
             (("--texts", str(tmp_path)), f"{tmp_path} is a folder"),
             (("--texts", "hello", "--control", str(tmp_path)), "use it with --baseline"),
             (("--texts", "hello", "--store", str(tmp_path)), "no feature store at")]
    for args, fragment in cases:
        code, _, err = run_cli("inspect", "--sae", str(tiny_sae_dir), *args)
        assert_one_line_error(code, err, fragment)


def test_a_refused_inspect_leaves_earlier_results_alone(tiny_sae_dir, tmp_path):
    out = tmp_path / "inspect.json"
    out.write_text('{"earlier": true}')
    code, _, err = run_cli("inspect", "--sae", str(tiny_sae_dir), "--texts", "hello", "--max-length", "0", "--out", str(out))
    assert_one_line_error(code, err, "--max-length must be >= 1, got 0")
    assert out.read_text() == '{"earlier": true}' and not (tmp_path / "report-section-inspect.html").exists()


def test_texts_argument_is_a_file_a_benchmark_or_plain_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("Natalia sold clips.\n\nJanet has ducks.\n")
    assert texts_of("notes.txt") == ["Natalia sold clips.", "Janet has ducks."]  # as train --data reads it
    for text in ("Natalia sold 3/4 of her clips", "hello", "x" * 5000, "See the notes below."):
        assert texts_of(text) == [text]
    for spec in ("missing.jsonl", "notes.TXT.gz", "data/prompts", "~/nowhere/notes", "my notes.csv"):
        with pytest.raises(SaescopeError, match=f"no such file: {spec}; to inspect these characters as a text"):
            texts_of(spec)
    (tmp_path / "folder").mkdir()
    with pytest.raises(SaescopeError, match="folder is a folder: give one prompt file"):
        texts_of("folder")
    (tmp_path / "gap.jsonl").write_text('{"text": "a"}\n{"text": " "}\n')
    with pytest.raises(SaescopeError, match="gap.jsonl: text 1 is empty"):
        texts_of("gap.jsonl")


@pytest.mark.parametrize("args,fragment", [
    ("inspect --sae s --texts x --max-length 0", "--max-length must be >= 1, got 0"),
    ("inspect --sae s --texts x --max-length -5", "--max-length must be >= 1, got -5"),
    ("inspect --sae s --texts x --top 0", "--top must be >= 1, got 0"),
    ("inspect --sae s --texts x --limit 0", "--limit must be >= 1, got 0"),
    ("inspect --sae s --texts x --limit -1", "--limit must be >= 1, got -1"),
    ("inspect --sae s --texts x --k 0", "--k must be >= 1, got 0"),
    ("features build --sae s --ctx-len 1", "--ctx-len must be >= 2, got 1"),
    ("features show --store s --layer -1 --feature 0", "--layer must be >= 0, got -1"),
    ("steer --sae s --layer 1 --feature 2 --strength 3 --prompt x --max-new-tokens 0", "--max-new-tokens must be >= 1, got 0"),
    ("steer --sae s --layer 1 --feature 2 --strength 3 --prompt x --temperature nan", "--temperature must be a finite number, got nan"),
    ("serve --sae s --port 70000", "--port must be <= 65535, got 70000"),
])
def test_numeric_flags_are_range_checked(args, fragment):
    with pytest.raises(SaescopeError, match=fragment):
        cli.parse_config(args.split())
