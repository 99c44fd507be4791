"""analyse() on a hand-made footprint folder whose containments are known."""

import json

import numpy as np
import pytest

from saescope import SaescopeError
from saescope.redundancy.analysis import analyse
from saescope.redundancy.footprint import FORMAT, Footprints, write_sets
from saescope.redundancy.metrics import FeatureSets


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
