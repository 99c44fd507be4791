"""saescope.api.sweep: SAEs of several kinds and k from one cache, evaluated beside their controls in one table; a
sweep run again keeps what it trained; bad sweeps are refused before any work."""

from __future__ import annotations

import json

import pytest

from saescope.api.sweep import SweepConfig, format_sweep, run_sweep
from saescope.core.activation_cache import CacheConfig, run_cache
from saescope.core.errors import SaescopeError


def test_a_sweep_trains_evaluates_and_compares_every_kind_and_k(tiny_qwen3, text_file, tmp_path):
    run_cache(CacheConfig(model=str(tiny_qwen3), data=str(text_file), out=str(tmp_path / "c"), layers="1", max_tokens=1024,
                          ctx_len=32, batch_size=4, model_dtype="fp32"))
    cfg = SweepConfig(activations=str(tmp_path / "c"), out=str(tmp_path / "s"), arch="topk,batchtopk", k="4,8", expansion=2,
                      max_tokens=1024, batch_size=4, ctx_len=32, eval_tokens=256)
    result = run_sweep(cfg)
    rows = json.loads((tmp_path / "s" / "sweep.json").read_text())["rows"]
    assert [(r["arch"], r["k"], r["layer"]) for r in rows] == [("topk", 4, 1), ("topk", 8, 1), ("batchtopk", 4, 1),
                                                              ("batchtopk", 8, 1)]
    for r in rows:
        assert 0 < r["fvu"] and 0 < r["control_fvu"] and r["train_tok_s"] > 0 and r["d_sae"] == 128
        assert r["control_l0"] == pytest.approx(r["k"])  # the control keeps k per token, whatever the kind
    top = {r["k"]: r for r in rows if r["arch"] == "topk"}
    assert top[4]["l0"] == pytest.approx(4, abs=0.01) and top[4]["l0_std"] < 0.2
    assert any(r["l0_std"] > 0.5 for r in rows if r["arch"] == "batchtopk")  # L0 varies per token
    assert (tmp_path / "s" / "sweep.png").stat().st_size > 1000
    assert (tmp_path / "s" / "batchtopk-k8" / "eval.json").exists()
    table = result.text()
    assert "batchtopk" in table and "L0 sd" in table and "sweep.json" in table
    mtime = (tmp_path / "s" / "topk-k4" / "train_summary.json").stat().st_mtime_ns
    run_sweep(cfg)  # again: the trained runs are kept, not retrained
    assert (tmp_path / "s" / "topk-k4" / "train_summary.json").stat().st_mtime_ns == mtime


def test_bad_sweeps_are_refused_on_construction(tmp_path):
    with pytest.raises(SaescopeError, match="gated is not a kind saescope trains"):
        SweepConfig(activations="c", out=str(tmp_path / "s"), arch="topk,gated")
    with pytest.raises(SaescopeError, match="not a comma-separated list of whole numbers"):
        SweepConfig(activations="c", out=str(tmp_path / "s"), k="16,x")
    with pytest.raises(SaescopeError, match="trains no jumprelu"):
        SweepConfig(activations="c", out=str(tmp_path / "s"), l0_coef=2.0)
    with pytest.raises(SaescopeError, match="give eval_tokens too"):
        SweepConfig(activations="c", out=str(tmp_path / "s"), quality=True)


def test_the_table_shows_the_columns_some_row_has():
    rows = [{"arch": "topk", "k": 8, "layer": 3, "train_tok_s": 1000.0, "l0": 8.0},
            {"arch": "jumprelu", "k": 8, "layer": 3, "train_tok_s": 900.0, "l0": 7.5, "fvu": 0.2}]
    lines = format_sweep(rows).splitlines()
    assert "FVU" in lines[0] and "top1" not in lines[0]
    assert lines[1].split()[-2:] == ["-", "8.0"] and lines[2].split()[-2:] == ["0.200", "7.5"]
