"""Coverage, greedy selection and feature-driven synthesis: hand-computed covers, the targets file's refusals,
and synthesis on a tiny real architecture (kept examples must fire their targets)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.conftest import assert_one_line_error, random_saes, run_cli, save_saes

from saescope.api.hits import FeatureHits
from saescope.api.scope import Scope
from saescope.apps.synthesis import SynthConfig, Target, TargetSet, coverage, derive_targets, greedy_cover, load_targets
from saescope.apps.synthesis.coverage import random_curve, target_matrix
from saescope.apps.synthesis.generate import at_equal_data, evidence_prompt, fires, synthesize
from saescope.core.errors import SaescopeError
from saescope.core.models import load_model


def test_coverage_and_greedy_cover_by_hand():
    fired = np.array([[1, 1, 0, 0, 0],
                      [0, 0, 1, 1, 0],
                      [1, 1, 1, 0, 0],
                      [0, 0, 0, 0, 0],
                      [0, 0, 0, 1, 0]], dtype=bool)
    cov = coverage(fired)
    assert cov["coverage"] == 0.8 and cov["covered"] == 4 and cov["texts_per_target"] == [2, 2, 2, 2, 0]
    # row 2 covers 3 targets, then row 1 adds target 3 (row 4 also would; the lower row wins the tie)
    assert greedy_cover(fired, 1.0) == [2, 1]
    assert greedy_cover(fired, 0.5) == [2]  # 3 of the 4 coverable targets reach half
    assert greedy_cover(np.zeros((3, 2), dtype=bool)) == []
    # twice over (targets 0-3 are fired by two rows each, target 4 by none): row 2 (3 new), then rows 0 and 1 tie
    # at 2 (row 0: targets 0, 1 again; row 1: targets 2 again, 3) and the lower wins, then row 1 (2), then row 4
    assert greedy_cover(fired, 1.0, times=2) == [2, 0, 1, 4]
    curve = random_curve(fired, [5], draws=3)
    assert curve[5]["mean"] == pytest.approx(0.8)  # every row drawn: the pool's own coverage


def test_targets_from_ids_files_and_refusals(tmp_path):
    ts = load_targets("3:7, 3/9,5:0")
    assert [(t.layer, t.feature) for t in ts.targets] == [(3, 7), (3, 9), (5, 0)]
    with pytest.raises(SaescopeError, match="not ids"):
        load_targets("3:7,x")
    saes = random_saes(16, [3, 5], d_sae=10)
    with pytest.raises(SaescopeError, match="out of range 0..9"):
        load_targets("3:10").check_saes(saes, "s")
    with pytest.raises(SaescopeError, match="no SAE for layer 4"):
        load_targets("4:1").check_saes(saes, "s")
    TargetSet([Target(3, 2, "negative", "why")], "m", "s", {3: "abc"}).save(tmp_path / "t.json")
    back = load_targets(str(tmp_path / "t.json"))
    assert back.targets == [Target(3, 2, "negative", "why")]
    with pytest.raises(SaescopeError, match="were chosen on the SAEs s"):
        back.check_saes(saes, "other")
    obj = json.loads((tmp_path / "t.json").read_text())
    obj["targets"][0]["label"] = "bad"
    (tmp_path / "b.json").write_text(json.dumps(obj))
    with pytest.raises(SaescopeError, match="must be one of positive, negative"):
        load_targets(str(tmp_path / "b.json"))


def test_derive_targets_by_hand():
    table = np.zeros((8, 4), dtype=bool)
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    table[[0, 1, 2], 0] = True  # positives only: a positive target
    table[[0, 4, 5], 1] = True  # fires on negatives too: not rare there
    table[[5, 6, 7], 2] = True  # negatives only: a negative target
    table[[3], 3] = True  # one positive only: below min_texts
    hits = FeatureHits({2: np.packbits(table, axis=1)}, {2: 4}, 8)
    got = derive_targets(hits, labels, n=4)
    assert [(t.layer, t.feature, t.label) for t in got] == [(2, 0, "positive"), (2, 2, "negative")]
    assert target_matrix(hits, got).sum(0).tolist() == [3, 3]
    # general text firing feature 0 often: only the negative target is specific
    busy = {2: np.array([0.2, 0.0, 0.001, 0.0])}
    got = derive_targets(hits, labels, n=4, background=busy, max_background=0.01)
    assert [(t.feature, t.label) for t in got] == [(2, "negative")]


def test_synthesis_keeps_only_what_fires_its_target(tiny_qwen3):
    lm = load_model(str(tiny_qwen3))
    scope = Scope(lm, random_saes(64, [1], model=str(tiny_qwen3)))
    targets = [Target(1, f, "positive") for f in range(0, 64, 8)]
    cfg = SynthConfig(budget=24, per_target=3, max_new_tokens=8, seed=1)
    result = synthesize(scope, lm, targets, np.zeros(len(targets), dtype=bool), cfg, progress=False)
    assert result["generated"] <= 24 and result["unguided"]["generated"] <= result["generated"]
    assert result["kept"] == len(result["examples"]) == sum(t["kept"] for t in result["per_target"])
    if result["examples"]:
        texts = [e["text"] for e in result["examples"]]
        hit = fires(scope, texts, targets)
        for e, row in zip(result["examples"], hit, strict=True):
            assert row[[(t.layer, t.feature) for t in targets].index(tuple(e["target"]))]
    assert result["coverage_after"] >= result["coverage_before"] == 0.0
    with pytest.raises(SaescopeError, match="steering needs"):
        synthesize(scope, load_model(str(tiny_qwen3)), targets, np.zeros(len(targets), dtype=bool),
                   SynthConfig(budget=2, steer=4.0), progress=False)
    # the control's kept examples follow the guided rule (each fires a target), and its curve rises with them
    u = result["unguided"]
    assert u["kept"] == len(u["curve"]) <= u["generated"] and u["curve"] == sorted(u["curve"])
    assert result["curve"] == sorted(result["curve"]) and len(result["curve"]) == result["kept"]
    # steering by a multiple of each target's top activation: the strengths are those multiples
    evidence = {(1, f): {"contexts": [], "promoted": [], "max_activation": 0.5 + f} for f in range(0, 64, 8)}
    covered = np.zeros(len(targets), dtype=bool)
    covered[0] = True
    steered = synthesize(scope, lm, targets, covered, SynthConfig(budget=2, per_target=1, max_new_tokens=4,
                                                                  steer="3x"),
                         evidence=evidence, progress=False)
    assert steered["steer"]["per_target"] == {f"1:{f}": 3.0 * (0.5 + f) for f in range(8, 64, 8)}  # not the covered 1:0
    with pytest.raises(SaescopeError, match="L1/8 has none"):
        synthesize(scope, lm, targets, covered, SynthConfig(budget=2, steer="3x"),
                   evidence={(1, 16): {"max_activation": 1.0}}, progress=False)
    prompt = evidence_prompt(Target(1, 2, "negative"), {"contexts": ["a b c"], "promoted": [" cat", " "]})
    assert "harmless" in prompt and "- a b c" in prompt and "cat" in prompt


def test_equal_data_comparison_and_steer_parsing_by_hand():
    # 3 targets, one covered by the seed; guided adds 1 example (-> 2/3), unguided adds 3 (-> 2/3, 2/3, 1)
    got = at_equal_data(1 / 3, [2 / 3], [2 / 3, 2 / 3, 1.0])
    assert got == {"examples": 1, "guided": 2 / 3, "unguided": 2 / 3}
    assert at_equal_data(0.25, [], [0.5]) == {"examples": 0, "guided": 0.25, "unguided": 0.25}
    assert at_equal_data(0.0, [0.1, 0.2, 0.3], [0.2, 0.2]) == {"examples": 2, "guided": 0.2, "unguided": 0.2}
    def strength(steer):
        return SynthConfig(steer=steer).strength()

    assert strength("8") == (8.0, False) and strength("2x") == (2.0, True) and strength(" 1.5X") == (1.5, True)
    assert strength(8) == (8.0, False) and strength("0x") == (0.0, False)  # off is off, whatever the unit
    for bad in ("x", "2y", "nan", "infx", ""):
        with pytest.raises(SaescopeError, match="^steer"):
            strength(bad)


def test_cli_coverage_and_synthesize(tiny_qwen3, tmp_path):
    sae_dir = save_saes(random_saes(64, [0, 1], model=str(tiny_qwen3)), tmp_path / "saes")
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the cat sat", "a dog ran far", "birds sing"]))
    code, out, err = run_cli("coverage", "--sae", str(sae_dir), "--targets", "0:1,0:2,1:3", "--data", str(texts),
                             "--json", str(tmp_path / "cov.json"))
    assert code == 0, err
    got = json.loads((tmp_path / "cov.json").read_text())
    assert got["n_targets"] == 3 and len(got["targets"]) == 3 and "coverage of 3 targets" in out
    code, out, err = run_cli("synthesize", "--sae", str(sae_dir), "--targets", "0:1,0:2,1:3", "--data", str(texts),
                             "--budget", "6", "--per-target", "2", "--max-new-tokens", "6", "--out", str(tmp_path / "syn.jsonl"))
    assert code == 0, err
    assert (tmp_path / "syn.json").is_file() and "unguided, same budget" in out and "at equal data" in out
    code, _, err = run_cli("synthesize", "--sae", str(sae_dir), "--targets", "0:1", "--data", str(texts),
                           "--steer", "2x", "--out", str(tmp_path / "y.jsonl"))
    assert_one_line_error(code, err, "needs a feature store")
    assert not (tmp_path / "y.jsonl").exists()
    code, _, err = run_cli("coverage", "--sae", str(sae_dir), "--targets", "0:99", "--data", str(texts))
    assert_one_line_error(code, err, "out of range 0..63")
    code, _, err = run_cli("synthesize", "--sae", str(sae_dir), "--targets", "0:1", "--data", str(texts),
                           "--generator", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "x.jsonl"))
    assert_one_line_error(code, err, "--generator")
    assert not (tmp_path / "x.jsonl").exists()
