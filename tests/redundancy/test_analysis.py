"""analyse() on a hand-made footprint folder whose containments are known."""

import json

import numpy as np
import pytest

from saescope import SaescopeError
from saescope.apps.redundancy.analysis import analyse, compare, load_result
from saescope.apps.redundancy.footprint import FORMAT, Footprints, write_sets
from saescope.apps.redundancy.metrics import FeatureSets
from saescope.apps.redundancy.performance import bench_scores
from saescope.apps.redundancy.render import format_compare


def _folder(tmp_path, benches: dict[str, list[list[int]]], d_sae=64):
    for name, rows in benches.items():
        write_sets(tmp_path / "sae" / f"{name}.safetensors", {3: FeatureSets.from_lists([np.array(r) for r in rows], d_sae)})
    meta = {"format": FORMAT, "version": 1, "sae": "x", "model": "m", "pool": "last", "layers": [3], "d_sae": d_sae, "k": 4,
            "max_length": 512, "control": None, "benchmarks": {b: {"n": len(r), "source": "hand", "hash": "0"} for b, r in benches.items()}}
    (tmp_path / "footprints.json").write_text(json.dumps(meta))
    return Footprints.load(tmp_path)


def test_containment_duplicates_and_statements(tmp_path):
    rng = np.random.default_rng(0)
    wide = [list(range(4 * i, 4 * i + 4)) for i in range(10)]  # covers features 0..39
    wide += [sorted(rng.choice(40, 4, replace=False).tolist()) for _ in range(20)]
    narrow = [sorted(rng.choice(10, 4, replace=False).tolist()) for _ in range(30)]  # features 0..9: inside wide
    other = [sorted((50 + rng.choice(14, 4, replace=False)).tolist()) for _ in range(30)]  # disjoint from both
    fp = _folder(tmp_path, {"wide": wide, "narrow": narrow, "copy": narrow, "other": other})
    res = analyse(fp, repeats=50, matched_repeats=10, progress=False)
    e = res["sets"]["sae"]["3"]
    b = res["benchmarks"]
    assert e["overlap"][b.index("narrow")][b.index("wide")] == pytest.approx(1.0)
    assert e["overlap"][b.index("wide")][b.index("narrow")] == pytest.approx(10 / 40)
    assert e["overlap"][b.index("other")][b.index("wide")] == 0.0
    assert e["footprint"] == {"wide": 40, "narrow": 10, "copy": 10, "other": 14}
    assert e["r_hat"]["narrow"]["mean"] > e["r_hat"]["wide"]["mean"]  # 10 features are covered sooner than 40
    drops = {(d["a"], d["b"]) for d in res["drop"]}
    assert ("narrow", "wide") in drops and ("copy", "wide") in drops and ("wide", "narrow") not in drops
    assert [(m["a"], m["b"]) for m in res["mutual"]] == [("copy", "narrow")]
    assert res["statements"][0]["matched"] == pytest.approx(1.0) and "control_agreement" not in res
    with pytest.raises(SaescopeError, match="layer 5 is not in the footprints"):
        analyse(fp, layer=5, progress=False)


def _scored_folder(tmp_path):
    rng = np.random.default_rng(1)
    benches = {b: [sorted(rng.choice(64, 4, replace=False).tolist()) for _ in range(12)]
               for b in ("gsm8k", "math", "arc_challenge", "winogrande", "mmlu")}
    return _folder(tmp_path, benches)


def test_compare_drops_benchmark_pairs_no_model_scored_on_both_and_says_so(tmp_path):
    res = analyse(_scored_folder(tmp_path / "fp"), repeats=5, matched_repeats=3, progress=False)
    rng = np.random.default_rng(0)
    rows = ["model,GSM8K,MATH,ARC,Winogrande"]  # no MMLU column: nothing to partial out, no KeyError
    for m in range(8):  # MATH scored for models 0-3 only, ARC for 4-7 only: that pair has no model in common
        s = rng.random(4).round(3)
        rows.append(f"m{m},{s[0]},{s[1] if m < 4 else ''},{s[2] if m >= 4 else ''},{s[3]}")
    table = tmp_path / "scores.csv"
    table.write_text("\n".join(rows) + "\n")
    cmp = compare(res, [], scores=bench_scores(res["benchmarks"], table), n_perm=50)
    assert cmp["pairs_dropped_unscored"] == ["math-arc_challenge"] and len(cmp["pair_scores"]) == 5
    assert "1 of 6 benchmark pairs dropped: fewer than 3 models have scores on both (math-arc_challenge)" in format_compare(cmp)
    p = cmp["pairs"]["sae/symmetric"]
    assert p["n_pairs"] == 5 and np.isfinite(p["pearson"]) and p["pearson_partial_mmlu"] is None
    assert all(np.isfinite(r["score_pearson"]) for r in cmp["pair_scores"])
    assert "no score column for: mmlu" in cmp["notes"][-2]


def test_redundancy_json_is_checked_field_by_field(tmp_path):
    res = analyse(_scored_folder(tmp_path / "fp"), repeats=5, matched_repeats=3, progress=False)
    path = tmp_path / "redundancy.json"
    path.write_text(json.dumps(res))
    assert load_result(path)["benchmarks"] == res["benchmarks"]
    bad = {"{}": "field 'layer' is missing",
           '{"layer": "3", "benchmarks": [], "sets": {}}': "field 'layer' must be an integer, got '3'",
           '{"layer": 3, "benchmarks": ["a", "a"], "sets": {"sae": {}}}': "field 'benchmarks' must list two or more distinct names",
           '{"layer": 3, "benchmarks": ["a", "b"], "sets": {}}': "field 'sets' has no 'sae' entry",
           '{"layer": 3, "benchmarks": ["a", "b"], "sets": {"sae": {"1": {}}}}':
               "field 'sets.sae' must be an object with an entry for layer 3",
           "[1, 2": "not valid JSON"}
    e = res["sets"]["sae"]["3"]
    for broken, msg in [({**e, "r_hat": {}}, "sets.sae.3: field 'r_hat' has no number gsm8k.mean"),
                        ({**e, "symmetric": e["symmetric"][:2]}, "sets.sae.3: field 'symmetric' must be a 5 x 5 matrix"),
                        ({k: v for k, v in e.items() if k != "matched"}, "sets.sae.3: field 'matched' is missing")]:
        bad[json.dumps({**res, "sets": {"sae": {"3": broken}}})] = msg
    for text, msg in bad.items():
        path.write_text(text)
        with pytest.raises(SaescopeError, match=msg) as exc:
            load_result(path)
        assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_damaged_footprint_folders_are_one_line_errors(tmp_path):
    fp = _scored_folder(tmp_path)
    meta = json.loads((tmp_path / "footprints.json").read_text())
    cases = {"{}": "is not a saescope footprint file", '{"format": "saescope-footprints"': "not valid JSON",
             json.dumps({**meta, "layers": "3"}): "field 'layers' must be a list",
             json.dumps({**meta, "layers": []}): "field 'layers' must list layer numbers",
             json.dumps({**meta, "d_sae": 0}): "field 'd_sae' must be >= 1",
             json.dumps({**meta, "benchmarks": {"gsm8k": {"n": "12", "hash": "0"}}}): "entry 'gsm8k' must be an object with a prompt count"}
    for text, msg in cases.items():
        (tmp_path / "footprints.json").write_text(text)
        with pytest.raises(SaescopeError, match=msg) as exc:
            Footprints.load(tmp_path)
        assert "footprints.json" in str(exc.value)
    (tmp_path / "footprints.json").write_text(json.dumps(meta))
    file = tmp_path / "sae" / "math.safetensors"
    good = file.read_bytes()
    file.write_bytes(good[: len(good) // 2])
    with pytest.raises(SaescopeError, match="cannot read .*math.safetensors: corrupt or truncated"):
        fp.sets("math", 3)
    file.unlink()
    with pytest.raises(SaescopeError, match="missing .*math.safetensors: the footprint folder is incomplete"):
        analyse(fp, repeats=2, matched_repeats=2, progress=False)
    file.write_bytes(good)
    write_sets(file, {4: fp.sets("gsm8k", 3)})  # another layer's tensors only
    with pytest.raises(SaescopeError, match="math.safetensors has no tensor layer3.indptr"):
        fp.sets("math", 3)
    write_sets(file, {3: FeatureSets.from_lists([np.array([1, 2])] * 11, 64)})  # 11 prompts where footprints.json says 12
    with pytest.raises(SaescopeError, match="math.safetensors: layer3.indptr/indices have shapes \\(12,\\)/\\(22,\\).*for 12 prompts"):
        fp.sets("math", 3)
    write_sets(file, {3: FeatureSets.from_lists([np.array([1, 64])] * 12, 64)})  # feature 64 of 0..63
    with pytest.raises(SaescopeError, match="layer3.indices holds features outside 0..63"):
        fp.sets("math", 3)


def test_compare_drops_pairs_with_a_constant_score_and_writes_no_nan(tmp_path):
    from saescope.apps.redundancy.render import write_compare

    res = analyse(_scored_folder(tmp_path / "fp"), repeats=5, matched_repeats=3, progress=False)
    rng = np.random.default_rng(0)
    rows = ["model,GSM8K,MATH,ARC,Winogrande,MMLU"]
    for m in range(8):  # Winogrande is 0.5 for every model: it correlates with nothing
        s = rng.random(4).round(3)
        rows.append(f"m{m},{s[0]},{s[1]},{s[2]},0.5,{s[3]}")
    table = tmp_path / "scores.csv"
    table.write_text("\n".join(rows) + "\n")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cmp = compare(res, [], scores=bench_scores(res["benchmarks"], table), n_perm=50)
    assert sorted(cmp["pairs_dropped_constant"]) == sorted(
        ["gsm8k-winogrande", "math-winogrande", "arc_challenge-winogrande", "winogrande-mmlu"])
    assert "4 of 10 benchmark pairs dropped: a score is the same for every model" in format_compare(cmp)
    assert all(np.isfinite(r["score_pearson"]) for r in cmp["pair_scores"])
    write_compare(cmp, tmp_path)
    text = (tmp_path / "compare.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in compare.json"))
