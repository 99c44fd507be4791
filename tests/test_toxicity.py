"""Toxicity rules: mining and the OR rule against hand-computed tables, the labelled-data boundary, the fast
classifier against the full encoder on a tiny real architecture, the rules file's refusals, and the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.conftest import SHARED, assert_one_line_error, random_saes, run_cli, save_saes, shared_file

from saescope.api.hits import FeatureHits, TextActivations, encode_labelled, scores
from saescope.api.rules import RuleSet, make_ruleset, mine_rules, rules_dtype, sparse_logistic
from saescope.api.scope import Scope
from saescope.apps.toxicity import RuleClassifier, lexical_baseline
from saescope.apps.toxicity.evaluate import (
    BenchConfig,
    benchmark,
    by_definition,
    by_language_and_definition,
    format_transfer,
    group_subset,
    transfer_matrix,
)
from saescope.apps.toxicity.render import by_definition_table
from saescope.core.data.labelled import group_split, load_labelled, text_source
from saescope.core.errors import SaescopeError
from saescope.core.models import load_model, token_strings


def text_activations(table: np.ndarray, seed: int = 0, means: np.ndarray | None = None) -> TextActivations:
    """The compressed rows of a dense (texts, features) table of max activations (and of mean ones, where given),
    from its entries shuffled."""
    r, f = np.nonzero(table > 0)
    order = np.random.default_rng(seed).permutation(len(r))
    return TextActivations.from_entries(r[order], f[order], table[r, f][order], table.shape[0], table.shape[1],
                                        None if means is None else means[r, f][order])


def hits_of(tables: dict[int, np.ndarray], means: dict[int, np.ndarray] | None = None) -> FeatureHits:
    """Hits of boolean tables; a float table gives its max activations too (fires where > 0), `means` their means."""
    return FeatureHits({n: np.packbits(t > 0, axis=1) for n, t in tables.items()},
                       {n: t.shape[1] for n, t in tables.items()}, next(iter(tables.values())).shape[0],
                       {n: text_activations(t, means=(means or {}).get(n)) for n, t in tables.items() if t.dtype.kind == "f"})


LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0])
# layer 3: feature 0 fires on 3 of 4 positives and 0 negatives (delta 0.75); feature 2 on 4/4 and 2/4 (0.5);
# feature 9 on 2/4 and 0/4 (0.5, ranked after 2 by index). layer 7: feature 5 on 4/4 and 1/4 (0.75: ties layer 3,
# whose lower number wins); feature 1 on 1/4 and 1/4 (0).
L3 = np.zeros((8, 11), dtype=bool)
L3[[0, 1, 2], 0] = True
L3[[0, 1, 2, 3, 4, 5], 2] = True
L3[[2, 3], 9] = True
L7 = np.zeros((8, 6), dtype=bool)
L7[[0, 1, 2, 3, 7], 5] = True
L7[[0, 4], 1] = True


def test_hits_pack_and_unpack_round_trip():
    h = hits_of({3: L3, 7: L7})
    assert np.array_equal(h.layer(3), L3) and np.array_equal(h.layer(7), L7)
    for f in range(11):
        assert np.array_equal(h.column(3, f), L3[:, f])
    sub = h.rows(np.array([True, False] * 4))
    assert sub.n == 4 and np.array_equal(sub.layer(3), L3[::2])


def test_mining_by_hand():
    rules, choice = mine_rules(hits_of({3: L3, 7: L7}), LABELS, (1, 2, 3), sparse=False)
    assert choice["chosen_layer"] == 3 and choice["layer_best_delta"] == {"3": 0.75, "7": 0.75}
    by = {r.name: r for r in rules}
    assert [f.feature for f in by["layer3-k1"].features] == [0]
    assert [f.feature for f in by["layer3-k3"].features] == [0, 2, 9]
    f = by["layer3-k2"].features[1]
    assert (f.feature, f.delta, f.p_positive, f.p_negative) == (2, 0.5, 1.0, 0.5)
    assert [(f.layer, f.feature) for f in by["multi-k2"].features] == [(3, 0), (7, 5)]
    assert "multi-k1" not in by
    # the OR rule: layer3-k2 fires on texts 0-5 (feature 2), so 4 true positives, 2 false positives
    pred = by["layer3-k2"].predict(hits_of({3: L3, 7: L7}))
    assert pred.tolist() == [True] * 6 + [False] * 2
    assert choice["mining_f1"]["layer3-k2"] == pytest.approx(2 * 4 / (6 + 4))
    assert choice["mining_balanced_accuracy"]["layer3-k2"] == pytest.approx((4 / 4 + 2 / 4) / 2)
    # multi-k2: feature 0 of layer 3 or feature 5 of layer 7 -> texts 0-3 and 7
    assert by["multi-k2"].predict(hits_of({3: L3, 7: L7})).tolist() == [True] * 4 + [False] * 3 + [True]
    # mined on one layer, there are no multi-layer rules (each would be layer3-k1 under another name)
    one, _ = mine_rules(hits_of({3: L3}), LABELS, (1, 2, 3), sparse=False)
    assert [r.name for r in one] == ["layer3-k1", "layer3-k2", "layer3-k3"]


def test_the_default_rule_is_the_best_balanced_accuracy_on_the_mining_texts():
    from tests.conftest import random_saes

    from saescope.core.data.labelled import LabelledSet

    # By hand: layer3-k1 flags texts 0-2 (F1 6/7, balanced accuracy (3/4 + 4/4) / 2 = 0.875); multi-k2 flags 0-3 and 7
    # (F1 8/9, balanced accuracy 0.875). F1 would pick multi-k2; the tie in balanced accuracy goes to fewer features.
    data = LabelledSet("hand", [f"text {i}" for i in range(8)], LABELS, [f"g{i}" for i in range(8)], [""] * 8)
    rules = make_ruleset(hits_of({3: L3, 7: L7}), data, random_saes(8, [3, 7], d_sae=11), model="m", sae="mem", ks=(1, 2),
                         sparse=False)
    assert rules.choice["mining_f1"]["multi-k2"] == pytest.approx(8 / 9)
    assert rules.choice["mining_f1"]["layer3-k1"] == pytest.approx(6 / 7)
    assert rules.default == "layer3-k1"
    assert rules.choice["default_by"] == "mining texts" and "cv_balanced_accuracy" not in rules.choice  # 4 + 4: no 5 folds
    # On a 6:2 set, k2 flags 7 of 8 texts (F1 12/13, balanced accuracy 0.75): F1 prefers it to k1, which flags the
    # first 4 positives only (F1 0.8, balanced accuracy (4/6 + 2/2) / 2 = 0.833)
    skewed = np.array([1, 1, 1, 1, 1, 1, 0, 0])
    table = np.zeros((8, 3), dtype=bool)
    table[[0, 1, 2, 3], 1] = True  # delta 4/6
    table[[0, 1, 2, 3, 4, 5, 6], 2] = True  # delta 1 - 1/2
    data = LabelledSet("skewed", data.texts, skewed, data.groups, data.functionality)
    rules = make_ruleset(hits_of({3: table}), data, random_saes(8, [3], d_sae=3, k=1), model="m", sae="mem", ks=(1, 2),
                         multi_layer=False, sparse=False)
    assert rules.choice["mining_f1"]["layer3-k2"] == pytest.approx(12 / 13)
    assert rules.choice["mining_f1"]["layer3-k1"] == pytest.approx(0.8)
    assert rules.choice["mining_balanced_accuracy"]["layer3-k1"] == pytest.approx(5 / 6) and rules.default == "layer3-k1"


def test_the_default_rule_is_the_best_in_cross_validation_when_the_mining_texts_allow_it(tmp_path):
    """20 positive and 20 negative texts. Feature 0 fires on 16 positives and 2 negatives; features 1-4 each on one of
    the 4 positives it misses. In-sample, layer3-k5 (feature 0 and the four) catches every positive: balanced accuracy
    (20/20 + 18/20) / 2 = 0.95 against layer3-k1's (16/20 + 18/20) / 2 = 0.85. Left out, a text's own feature is never
    mined on the other folds (it fires nowhere else), so k5 predicts what k1 predicts: the same CV score, and the tie
    goes to the smaller rule."""
    from tests.conftest import random_saes

    from saescope.api.rules import cross_validated
    from saescope.core.data.labelled import LabelledSet

    labels = np.array([1] * 20 + [0] * 20)
    table = np.zeros((40, 5), dtype=bool)
    table[:16, 0] = True
    table[[20, 21], 0] = True
    for f, text in enumerate(range(16, 20), start=1):
        table[text, f] = True
    data = LabelledSet("planted", [f"text {i}" for i in range(40)], labels, [f"g{i}" for i in range(40)], [""] * 40)
    saes = random_saes(8, [3], d_sae=5, k=1)
    rules = make_ruleset(hits_of({3: table}), data, saes, model="m", sae="mem", ks=(1, 5), multi_layer=False, sparse=False)
    assert rules.choice["mining_balanced_accuracy"] == {"layer3-k1": pytest.approx(0.85), "layer3-k5": pytest.approx(0.95)}
    cv = rules.choice["cv_balanced_accuracy"]
    assert rules.choice["default_by"] == "5-fold CV" and cv["layer3-k1"] == cv["layer3-k5"] and rules.default == "layer3-k1"
    # each of the 5 stratified folds holds 4 positives and 4 negatives: feature 0 catches on average 16/20 of the left-out
    # positives and rejects 18/20 of the negatives whichever fold they fall in
    assert cv["layer3-k1"] == pytest.approx(0.85)
    in_sample = make_ruleset(hits_of({3: table}), data, saes, model="m", sae="mem", ks=(1, 5), multi_layer=False,
                             sparse=False, folds=0)
    assert in_sample.default == "layer3-k5" and in_sample.choice["default_by"] == "mining texts"
    assert cross_validated(hits_of({3: table[16:24]}), labels[16:24], (1,), sparse=False) is None  # 4 + 4: a fold is empty
    rules.save(tmp_path / "rules.json")
    assert RuleSet.load(tmp_path / "rules.json").choice["cv_balanced_accuracy"] == cv


def test_mining_refuses_what_it_cannot_do():
    with pytest.raises(SaescopeError, match="fewer than K=10"):
        mine_rules(hits_of({3: L3}), LABELS, (1, 10))
    with pytest.raises(SaescopeError, match="no feature of any layer fires more often"):
        mine_rules(hits_of({3: L3}), 1 - LABELS, (1,))
    # features with no positive delta are left out of a rule rather than padding it to K
    rules, _ = mine_rules(hits_of({7: L7}), LABELS, (2,), sparse=False)
    assert [f.feature for f in rules[0].features] == [5]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 20), st.integers(0, 10_000), st.floats(0.0, 0.9))
def test_text_activations_hold_the_dense_tables(n, d, seed, density):
    rng = np.random.default_rng(seed)
    table = np.where(rng.random((n, d)) < density, rng.random((n, d)).astype(np.float32) + 0.01, 0).astype(np.float32)
    means = (table * rng.uniform(0.1, 1.0, (n, d))).astype(np.float32)  # a mean is at most the max, > 0 where it fires
    acts = text_activations(table, seed, means)
    assert np.array_equal(acts.columns(range(d)), table) and np.array_equal(acts.columns(range(d), "mean"), means)
    cols = rng.integers(0, d, 5)  # any order, repeats allowed
    assert np.array_equal(acts.columns(cols), table[:, cols]) and np.array_equal(acts.columns(cols, "mean"), means[:, cols])
    mask = rng.random(n) < 0.5
    assert np.array_equal(acts.rows(mask).columns(range(d)), table[mask])
    assert np.array_equal(acts.rows(mask).columns(range(d), "mean"), means[mask])
    with pytest.raises(SaescopeError, match="no means"):
        text_activations(table, seed).columns(range(d), "mean")


def test_a_weighted_rule_reads_strength_where_firing_anywhere_says_nothing():
    """Feature 2 fires on every text (delta 0: no OR or sparse rule can use it), strongly (3) on the positives and
    weakly (1) on the negatives; feature 0 is noise that fires on half the texts of each class; feature 1 fires on
    two positives only (the best delta, 0.1, so that the layer has one)."""
    labels = np.array([1, 0] * 20)
    table = np.zeros((40, 4), dtype=np.float32)
    table[:, 2] = np.where(labels == 1, 3.0, 1.0)
    table[::4, 0] = 2.0
    table[1::4, 0] = 2.0
    table[[0, 2], 1] = 1.0
    hits = hits_of({4: table})
    rules, choice = mine_rules(hits, labels, (1,), multi_layer=False)
    by = {r.name: r for r in rules}
    weighted = by["weighted4-k1"]
    assert [f.feature for f in weighted.features] == [2] and weighted.scales == (pytest.approx(3.0),)
    assert choice["mining_balanced_accuracy"]["weighted4-k1"] == 1.0 and choice["mining_balanced_accuracy"]["sparse4-k1"] <= 0.55
    assert np.array_equal(weighted.predict(hits), labels.astype(bool))
    # the score is bias + weight x activation / scale: positive at full strength, negative at a third of it
    w, b = weighted.weights[0], weighted.bias
    assert weighted.decide({(4, 2): {"max": 3.0}}) == (True, pytest.approx(b + w))
    assert weighted.decide({(4, 2): {"max": 1.0}}) == (False, pytest.approx(b + w / 3))
    assert not hits_of({4: table > 0}).activations and "weighted4-k1" not in {
        r.name for r in mine_rules(hits_of({4: table > 0}), labels, (1,))[0]}  # no activations, no weighted rules
    assert "mean4-k1" not in by  # max activations without their means: no mean rules


def test_a_mean_rule_reads_how_much_of_the_text_a_feature_covers():
    """Feature 2 fires on every text with the same max activation (2.0: neither an OR, a sparse nor a weighted rule
    can use it), on most tokens of the positives (mean 1.5) and on one token of the negatives (mean 0.2); feature 1
    fires on two positives only (the layer's best delta)."""
    labels = np.array([1, 0] * 20)
    table = np.zeros((40, 4), dtype=np.float32)
    table[:, 2] = 2.0
    table[[0, 2], 1] = 1.0
    means = np.zeros_like(table)
    means[:, 2] = np.where(labels == 1, 1.5, 0.2)
    means[[0, 2], 1] = 0.5
    hits = hits_of({4: table}, {4: means})
    rules, choice = mine_rules(hits, labels, (1,), multi_layer=False)
    by = {r.name: r for r in rules}
    mean = by["mean4-k1"]
    assert (mean.kind, mean.statistic, [f.feature for f in mean.features]) == ("mean", "mean", [2])
    assert mean.scales == (pytest.approx(1.5),)  # the 99th percentile of 20 x 0.2 and 20 x 1.5
    assert np.array_equal(mean.predict(hits), labels.astype(bool)) and choice["mining_balanced_accuracy"]["mean4-k1"] == 1.0
    assert choice["mining_balanced_accuracy"]["weighted4-k1"] < 0.6  # the max alone sees feature 1's two texts at most
    w, b = mean.weights[0], mean.bias
    assert mean.decide({(4, 2): {"mean": 1.5, "max": 2.0}}) == (True, pytest.approx(b + w * 1.5 / mean.scales[0]))
    assert not mean.decide({(4, 2): {"mean": 0.2, "max": 2.0}})[0]


def test_a_both_rule_weighs_a_feature_by_its_max_and_by_its_mean():
    """Positive when feature 2 covers much of the text (mean 1.5 against 0.2) OR feature 3 fires strongly on one
    token (max 3.0 against 1.0; its mean the same small 0.1 on every text): neither statistic alone carries both
    features, a rule over both reads feature 2's mean and feature 3's max."""
    rng = np.random.default_rng(0)
    n = 200
    a, c = rng.random(n) < 0.5, rng.random(n) < 0.5  # the two causes, independent
    labels = (a | c).astype(np.int64)
    table = np.zeros((n, 5), dtype=np.float32)
    means = np.zeros_like(table)
    table[:, 2], means[:, 2] = 2.0, np.where(a, 1.5, 0.2)
    table[:, 3], means[:, 3] = np.where(c, 3.0, 1.0), 0.1
    first = np.flatnonzero(labels == 1)[:2]
    table[first, 1], means[first, 1] = 1.0, 0.5  # two positives only: the layer's best delta
    hits = hits_of({4: table}, {4: means})
    rules, choice = mine_rules(hits, labels, (2,), multi_layer=False)
    by = {r.name: r for r in rules}
    both = by["both4-k2"]
    assert both.kind == "both" and both.statistic == "max+mean"
    assert sorted(zip((f.feature for f in both.features), both.reads, strict=True)) == [(2, "mean"), (3, "max")]
    assert both.term_reads == both.reads and both.scales == tuple(pytest.approx(v) for v in
                                                                  (1.5 if r == "mean" else 3.0 for r in both.reads))
    bal = choice["mining_balanced_accuracy"]
    assert bal["both4-k2"] == 1.0 and max(bal["mean4-k2"], bal["weighted4-k2"]) < 0.85
    assert np.array_equal(both.predict(hits), labels.astype(bool))
    # decide reads each term's statistic; the score is the bias plus each term's weight x activation / scale
    w = dict(zip(both.reads, both.weights, strict=True))
    fired = {(4, 2): {"max": 2.0, "mean": 1.5}, (4, 3): {"max": 1.0, "mean": 0.1}}
    assert both.decide(fired) == (True, pytest.approx(both.bias + w["mean"] + w["max"] / 3))
    assert not both.decide({(4, 2): {"max": 2.0, "mean": 0.2}, (4, 3): {"max": 1.0, "mean": 0.1}})[0]
    assert [t[0] for t in both.terms(4, 2, fired[(4, 2)])] == ["mean"] and both.terms(4, 1, fired[(4, 2)]) == []


def test_one_l1_path_gives_every_k_what_its_own_bisection_gives():
    """Three of 40 columns carry a logistic signal of decreasing strength: the path finds them in order, never more
    than K, and each K's columns and weights are those of a path mined for that K alone (warm starts move the
    solver's start, not the optimum it stops at)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 40))
    labels = (rng.random(600) < 1 / (1 + np.exp(-(3 * x[:, 7] - 2 * x[:, 21] + 1 * x[:, 33])))).astype(np.int64)
    path = sparse_logistic(x, labels, (1, 2, 3, 8))
    assert path[1][0] == [7] and path[2][0] == [7, 21] and sorted(path[3][0]) == [7, 21, 33]
    assert all(len(path[k][0]) <= k for k in path) and set(path[3][0]) <= set(path[8][0])
    assert path[3][1][0] > 0 > path[3][1][1]  # the signs of the true weights
    for k in (1, 3, 8):
        cols, weights, bias = sparse_logistic(x, labels, (k,))[k]
        assert cols == path[k][0]
        np.testing.assert_allclose(weights, path[k][1], rtol=1e-6)
        assert bias == pytest.approx(path[k][2], rel=1e-6, abs=1e-9)
    # columns that are the same on both classes (zeros; ones, balanced) leave the path nothing: a clear error
    for table in (np.zeros((600, 3)), np.ones((600, 3))):
        with pytest.raises(SaescopeError, match="no column of the table differs between the classes"):
            sparse_logistic(table, np.tile([0, 1], 300), (1, 2))


def _and_table(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positive exactly when features 3 ("a slur") AND 5 ("a target") both fire; each fires on half the texts alone,
    feature 1 is noise."""
    rng = np.random.default_rng(seed)
    table = rng.random((n, 8)) < 0.5
    return table, (table[:, 3] & table[:, 5]).astype(np.int64)


def test_a_sparse_rule_says_and_where_the_or_rule_cannot():
    table, labels = _and_table()
    rules, choice = mine_rules(hits_of({4: table}), labels, (1, 2))
    by = {r.name: r for r in rules}
    sparse = by["sparse4-k2"]
    assert sorted(f.feature for f in sparse.features) == [3, 5] and len(sparse.weights) == 2
    # an AND: each weight alone stays below the bias, the two together cross it
    assert sparse.bias < 0 and all(sparse.bias + w < 0 for w in sparse.weights) and sparse.bias + sum(sparse.weights) > 0
    assert np.array_equal(sparse.predict(hits_of({4: table})), labels.astype(bool))
    assert choice["mining_balanced_accuracy"]["sparse4-k2"] == 1.0
    assert choice["mining_balanced_accuracy"]["layer4-k2"] < 0.8  # OR of the two: positive on 3/4 of the texts
    assert sparse.decide({(4, 3): 1.0, (4, 5): 1.0})[0] and not sparse.decide({(4, 3): 1.0})[0]
    assert len(by["sparse4-k1"].features) == 1  # at most K features


def test_sparse_rules_round_trip_and_bad_weights_are_refused(tmp_path):
    from saescope.core.data.labelled import LabelledSet

    table, labels = _and_table()
    data = LabelledSet("and", [f"t{i}" for i in range(len(labels))], labels, [f"g{i}" for i in range(len(labels))],
                       [""] * len(labels))
    rules = make_ruleset(hits_of({4: table}), data, random_saes(8, [4], d_sae=8, k=2), model="m", sae="mem", ks=(2,),
                         model_dtype="bf16")
    rules.save(tmp_path / "rules.json")
    back = RuleSet.load(tmp_path / "rules.json")
    assert back.rule("sparse4-k2") == rules.rule("sparse4-k2") and back.default == "sparse4-k2"
    obj = json.loads((tmp_path / "rules.json").read_text())
    assert obj["version"] == 7 and obj["model_dtype"] == back.model_dtype == "bf16"
    # the dtype the rules were mined in is what eval and classify apply them in, unless told otherwise
    assert (rules_dtype(None, back), rules_dtype("fp32", back), rules_dtype("auto", back)) == ("bf16", "fp32", "auto")
    for bad in ("int8", 16):
        (tmp_path / "bad.json").write_text(json.dumps(obj | {"model_dtype": bad}))
        with pytest.raises(SaescopeError, match="model_dtype"):
            RuleSet.load(tmp_path / "bad.json")
    # a version 6 file (before the dtype was recorded) loads, and is applied in fp32, the commands' old default
    v6 = {k: v for k, v in obj.items() if k != "model_dtype"} | {"version": 6}
    (tmp_path / "v6.json").write_text(json.dumps(v6))
    old6 = RuleSet.load(tmp_path / "v6.json")
    assert old6.model_dtype is None and rules_dtype(None, old6) == "fp32" and old6.rules == back.rules
    for bad in ([1.0], [float("nan"), 1.0], ["x", 1.0]):
        broken = json.loads((tmp_path / "rules.json").read_text())
        next(r for r in broken["rules"] if r["kind"] == "sparse")["weights"] = bad
        (tmp_path / "bad.json").write_text(json.dumps(broken))
        with pytest.raises(SaescopeError, match="sparse rule needs one finite weight per feature|weights"):
            RuleSet.load(tmp_path / "bad.json")


def test_weighted_rules_round_trip_and_bad_scales_are_refused(tmp_path):
    from saescope.core.data.labelled import LabelledSet

    table, labels = _and_table()
    strength = table * np.random.default_rng(1).uniform(0.5, 4.0, table.shape).astype(np.float32)
    data = LabelledSet("and", [f"t{i}" for i in range(len(labels))], labels, [f"g{i}" for i in range(len(labels))],
                       [""] * len(labels))
    hits = hits_of({4: strength}, {4: strength * 0.3})
    rules = make_ruleset(hits, data, random_saes(8, [4], d_sae=8, k=2), model="m", sae="mem", ks=(2,))
    rules.save(tmp_path / "rules.json")
    back = RuleSet.load(tmp_path / "rules.json")
    for name in ("weighted4-k2", "mean4-k2", "both4-k2"):
        assert back.rule(name) == rules.rule(name) and len(back.rule(name).scales) == 2
        assert np.array_equal(back.rule(name).predict(hits), rules.rule(name).predict(hits))
    assert len(back.rule("both4-k2").reads) == 2
    for bad in (["max"], ["max", "median"], None):  # a both rule names one statistic, max or mean, per term
        broken = json.loads((tmp_path / "rules.json").read_text())
        rule = next(r for r in broken["rules"] if r["kind"] == "both")
        if bad is None:
            del rule["reads"]
        else:
            rule["reads"] = bad
        (tmp_path / "bad.json").write_text(json.dumps(broken))
        with pytest.raises(SaescopeError, match="both rule needs one statistic, max or mean, per feature|reads"):
            RuleSet.load(tmp_path / "bad.json")
    # a version 5 file (before rules over both statistics) still loads as it was written
    v5 = json.loads((tmp_path / "rules.json").read_text())
    v5["version"] = 5
    v5["rules"] = [r for r in v5["rules"] if r["kind"] != "both"]
    v5["default"] = v5["rules"][0]["name"]
    (tmp_path / "v5.json").write_text(json.dumps(v5))
    assert {r.kind for r in RuleSet.load(tmp_path / "v5.json").rules} == {"layer", "sparse", "weighted", "mean"}
    for kind in ("weighted", "mean", "both"):
        for bad in ([1.0], [0.0, 1.0], [-1.0, 1.0], [float("inf"), 1.0], None):
            broken = json.loads((tmp_path / "rules.json").read_text())
            rule = next(r for r in broken["rules"] if r["kind"] == kind)
            if bad is None:
                del rule["scales"]
            else:
                rule["scales"] = bad
            (tmp_path / "bad.json").write_text(json.dumps(broken))
            with pytest.raises(SaescopeError, match=f"{kind} rule needs one finite positive scale per feature|scales"):
                RuleSet.load(tmp_path / "bad.json")
    # a version 4 file (before mean rules) still loads as it was written
    v4 = json.loads((tmp_path / "rules.json").read_text())
    v4["version"] = 4
    v4["rules"] = [r for r in v4["rules"] if r["kind"] not in ("mean", "both")]
    v4["default"] = v4["rules"][0]["name"]
    (tmp_path / "v4.json").write_text(json.dumps(v4))
    assert {r.kind for r in RuleSet.load(tmp_path / "v4.json").rules} == {"layer", "sparse", "weighted"}
    # a version 3 file (before weighted rules) still loads as it was written
    old = json.loads((tmp_path / "rules.json").read_text())
    old["version"] = 3
    old["rules"] = [r for r in old["rules"] if r["kind"] not in ("weighted", "mean", "both")]
    old["default"] = old["rules"][0]["name"]
    (tmp_path / "v3.json").write_text(json.dumps(old))
    assert {r.kind for r in RuleSet.load(tmp_path / "v3.json").rules} == {"layer", "sparse"}


def test_scores_by_hand():
    s = scores(np.array([True, True, False, False, True]), np.array([1, 0, 1, 0, 1]))
    assert (s["precision"], s["recall"], s["accuracy"]) == (2 / 3, 2 / 3, 3 / 5)
    assert s["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert s["f1"] == pytest.approx(2 / 3)
    assert scores(np.zeros(3, dtype=bool), np.array([1, 1, 0]))["f1"] == 0.0


def test_lexical_baseline_reads_words():
    from saescope.core.data.labelled import LabelledSet

    texts = ["you are vile scum", "they are vile", "vile people", "scum everywhere", "nice day", "a nice cat",
             "the day is long", "cat and dog"] * 2
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0] * 2)
    ds = LabelledSet("t", texts, labels, [f"g{i}" for i in range(16)], [""] * 16)
    target = LabelledSet("u", ["vile scum", "a long day"], np.array([1, 0]), ["a", "b"], ["", ""])
    assert lexical_baseline(ds, [target])[0].tolist() == [True, False]


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_labels_aliases_and_refusals(tmp_path):
    ok = _write_csv(tmp_path / "ok.csv", [{"text": "a", "label": "Hateful "}, {"text": "b", "label": "clean"},
                                           {"text": "c", "label": "1"}, {"text": "d", "label": "FALSE"}])
    ds = load_labelled(ok)
    assert ds.labels.tolist() == [1, 0, 1, 0] and ds.groups == ["row1", "row2", "row3", "row4"]
    bad = _write_csv(tmp_path / "bad.csv", [{"text": "a", "label": "maybe"}, {"text": "b", "label": "clean"}])
    with pytest.raises(SaescopeError, match="'maybe'"):
        load_labelled(bad)
    empty = _write_csv(tmp_path / "empty.csv", [{"text": " ", "label": "toxic"}, {"text": "b", "label": "clean"}])
    with pytest.raises(SaescopeError, match="empty text"):
        load_labelled(empty)
    one = _write_csv(tmp_path / "one.csv", [{"text": "a", "label": "toxic"}, {"text": "b", "label": "toxic"}])
    with pytest.raises(SaescopeError, match="all of one class"):
        load_labelled(one)
    with pytest.raises(SaescopeError, match="no label column 'y'"):
        load_labelled(ok, label_column="y")


def test_text_source_reads_files_sets_and_literals(tmp_path):
    """The one reader behind `toxicity classify --texts` and `coverage/synthesize --data`."""
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"body": t}) + "\n" for t in ("one", "two", "three")))
    src = text_source(str(plain), text_column="body", limit=2)
    assert src.n is None and src.labelled is None and list(src.texts) == ["one", "two"]  # streamed, first rows
    ok = _write_csv(tmp_path / "ok.csv", [{"text": t, "label": lab} for t, lab in
                                           [("a", "toxic"), ("b", "clean"), ("c", "toxic"), ("d", "clean")]])
    src = text_source(str(ok), label_column="label", limit=3)  # labelled: a seeded sample, not the first rows
    texts = list(src.texts)
    assert src.n == 3 and len(set(texts)) == 3 and src.labelled.labels.tolist() == [{"a": 1, "b": 0, "c": 1, "d": 0}[t] for t in texts]
    assert list(text_source("Je déteste les lundis.", literal=True).texts) == ["Je déteste les lundis."]
    with pytest.raises(SaescopeError, match="^data Je déteste les lundis.: not a file nor a built-in labelled set"):
        text_source("Je déteste les lundis.")  # a literal only where the command takes one
    with pytest.raises(SaescopeError, match="^texts is empty"):
        text_source("  ", literal=True, param="texts")
    with pytest.raises(SaescopeError, match="no such file"):
        text_source(str(tmp_path / "missing.csv"), literal=True)
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"body": " "}) + "\n")
    with pytest.raises(SaescopeError, match="no text in column 'body'"):
        list(text_source(str(blank), text_column="body").texts)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SaescopeError, match="no texts"):
        list(text_source(str(empty)).texts)


def test_hatecheck_splits_by_template():
    shared_file(SHARED / "toxicity" / "hatecheck_en.csv")
    ds = load_labelled("hatecheck_en")
    assert len(ds) == 3728 and ds.counts() == (1165, 2563) and ds.language == "en"
    mine, held = group_split(ds)
    assert not set(mine.groups) & set(held.groups)
    assert 0.2 < len(held) / len(ds) < 0.4
    fr = load_labelled("french")
    assert fr.name == "mhc_french" and fr.texts[0] == "Je déteste les femmes." and fr.language == "fr"
    # a subset of templates keeps whole templates
    mask = group_subset(mine, 0.1, np.random.default_rng(0))
    kept = {g for g, m in zip(mine.groups, mask, strict=True) if m}
    assert all(m == (g in kept) for g, m in zip(mine.groups, mask, strict=True))


@pytest.fixture(scope="module")
def hate_sample() -> object:
    shared_file(SHARED / "toxicity" / "hatecheck_en.csv")
    ds = load_labelled("hatecheck_en")
    rng = np.random.default_rng(0)
    return ds.subset(np.isin(np.arange(len(ds)), rng.choice(len(ds), 160, replace=False)), "hatecheck_sample")


def test_fast_classifier_equals_full_encoder(tiny_qwen3, hate_sample):
    scope = Scope(load_model(str(tiny_qwen3)), random_saes(64, [0, 2], model=str(tiny_qwen3)))
    enc = encode_labelled(scope, hate_sample, activations=True, progress=False)
    rules = make_ruleset(enc.hits["sae"], hate_sample, scope.saes, model=scope.lm.name, sae="mem", ks=(1, 2, 5))
    assert {r.kind for r in rules.rules} == {"layer", "multi", "sparse", "weighted", "mean", "both"}
    # every kind at its largest K and the OR rules at every K: a kind's smaller K take the same path on fewer features
    for rule in (r for r in rules.rules if r.kind in ("layer", "multi") or r.k == 5):
        clf = RuleClassifier(scope, rules, rule.name)
        decisions = list(clf.decisions(hate_sample.texts, batch_size=7, progress=False))
        assert [d.positive for d in decisions] == rule.predict(enc.hits["sae"]).tolist(), rule.name
        assert [d.index for d in decisions] == list(range(len(hate_sample)))
        assert clf.candidate_tokens < clf.tokens  # the full encoder ran on candidates only
    # an audit names tokens whose activation is the full code's value there
    d = next(d for d in decisions if d.positive)
    f = d.fired[0]
    ids = scope._token_ids([d.text], 256)[0]
    acts = scope.encode([d.text], layers=[f["layer"]], progress=False)[0].layers[f["layer"]]
    for tok in f["tokens"]:
        row = acts.indices[tok["position"]].tolist()
        assert f["feature"] in row and tok["position"] > 0
        assert tok["activation"] == pytest.approx(float(acts.values[tok["position"]][row.index(f["feature"])]), abs=1e-4)
        assert tok["token"] == token_strings(scope.lm.tokenizer, ids)[tok["position"]]


def test_rules_file_round_trip_and_refusals(tiny_qwen3, hate_sample, tmp_path):
    scope = Scope(load_model(str(tiny_qwen3)), random_saes(64, [0, 2], model=str(tiny_qwen3)))
    enc = encode_labelled(scope, hate_sample, progress=False)
    rules = make_ruleset(enc.hits["sae"], hate_sample, scope.saes, model=scope.lm.name, sae="mem")
    rules.save(tmp_path / "rules.json")
    back = RuleSet.load(tmp_path / "rules.json")
    assert back.to_json() == rules.to_json()
    other = Scope(scope.lm, random_saes(64, [0, 2], seed=5))
    with pytest.raises(SaescopeError, match="not on other"):
        RuleClassifier(other, back, sae_spec="other")
    with pytest.raises(SaescopeError, match="were mined on model"):
        back.check_saes(scope.saes, "mem", "some-other-model")
    obj = json.loads((tmp_path / "rules.json").read_text())
    obj["rules"][0]["features"][0]["layer"] = 9
    (tmp_path / "bad.json").write_text(json.dumps(obj))
    with pytest.raises(SaescopeError, match="layer 9 has no SAE fingerprint"):
        RuleSet.load(tmp_path / "bad.json")


def test_benchmark_and_transfer_on_a_tiny_model(tiny_qwen3, hate_sample):
    scope = Scope(load_model(str(tiny_qwen3)), random_saes(64, [0, 2], model=str(tiny_qwen3)))
    control = random_saes(64, [0, 2], seed=11)
    mine, held = group_split(hate_sample)
    m, h = (encode_labelled(scope, s, control=control, progress=False) for s in (mine, held))
    cfg = BenchConfig(ks=(1, 2), fractions=(0.5, 1.0), draws=2)
    out = benchmark(m, h, cfg)
    assert set(out["sets"]) == {"sae", "control"} and set(out["baselines"]) == {"lexical", "probe", "always positive"}
    rule = next(iter(out["sets"]["sae"]["rules"].values()))
    assert 0 <= rule["f1"] <= 1 and sum(v["n"] for v in rule["functionality"].values()) == len(held)
    # the 100% point of the curve is the rules mined on all the mining texts
    full = out["curve"]["sae"]["1.0"]["f1"]["layer-k1"]["mean"]
    assert full == pytest.approx(out["sets"]["sae"]["rules"][f"layer{out['sets']['sae']['choice']['chosen_layer']}-k1"]["f1"])
    matrix = transfer_matrix({"a": (m, h), "b": (h, m)}, cfg)
    assert matrix["sae"]["a"]["a"]["f1"]["layer-k1"] == pytest.approx(full)
    assert matrix["always positive"]["a"]["balanced_accuracy"] == 0.5
    assert set(matrix) == {"sae", "control", "probe", "lexical", "always positive", "sizes", "definitions", "languages",
                           "by_definition"}  # no language split: the sample's sets have no known definition
    assert matrix["languages"] == {"a": m.data.language, "b": h.data.language}
    assert matrix["sizes"]["a"] == {"mine": {"texts": len(m.data), "positive": int(m.data.labels.sum())},
                                    "held_out": {"texts": len(h.data), "positive": int(h.data.labels.sum())}}
    table = format_transfer(matrix, rules=("layer-k1",))
    assert f"a {len(m.data)} ({int(m.data.labels.sum())}) / {len(h.data)}" in table
    assert table.count("transfer matrix") == 2 and table.count("always +") == 2  # F1 and balanced accuracy


def test_transfer_pairs_are_averaged_by_label_definition():
    """by_definition: the off-diagonal pairs of sets labelling the same thing, and of sets labelling different things,
    averaged by hand; a set of unknown definition takes part in neither."""
    sets = ["en", "de", "es", "xx"]
    defs = {"en": "offensive", "de": "offensive", "es": "hate", "xx": ""}
    acc = {(s, t): 0.5 + 0.01 * i for i, (s, t) in enumerate((s, t) for s in sets for t in sets)}
    cell = lambda s, t, k: {"balanced_accuracy": {"both-k5": acc[s, t] + k}, "f1": {"both-k5": 0.0}}  # noqa: E731
    matrix = {"sae": {s: {t: cell(s, t, 0) for t in sets} for s in sets},
              "control": {s: {t: cell(s, t, -0.1) for t in sets} for s in sets},
              "probe": {s: {t: {"balanced_accuracy": acc[s, t] + 0.2, "f1": 0.0} for t in sets} for s in sets},
              "definitions": defs}
    got = by_definition(matrix)
    same = [("en", "de"), ("de", "en")]
    different = [("en", "es"), ("es", "en"), ("de", "es"), ("es", "de")]
    assert got["same"]["pairs"] == 2 and got["different"]["pairs"] == 4
    assert got["same"]["sae"]["both-k5"] == pytest.approx(np.mean([acc[p] for p in same]))
    assert got["same"]["control"]["both-k5"] == pytest.approx(np.mean([acc[p] for p in same]) - 0.1)
    assert got["different"]["sae"]["both-k5"] == pytest.approx(np.mean([acc[p] for p in different]))
    assert got["different"]["probe"] == pytest.approx(np.mean([acc[p] for p in different]) + 0.2)
    assert "lexical" not in got["same"]
    table = format_transfer({**matrix, "by_definition": got}, rules=("both-k5",))
    assert "same definition (2 pairs)" in table and "different definition (4 pairs)" in table and "xx: ?" in table
    section = by_definition_table({**matrix, "by_definition": got}, "both-k5")
    assert section.count("<tr>") == 3 and "different definition" in section and "xx: ?" in section
    assert f"{got['same']['sae']['both-k5']:.4g}" in section
    assert by_definition_table({"by_definition": {"same": {"pairs": 0}}}, "both-k5") == ""


def test_transfer_pairs_are_split_by_language_where_a_language_has_two_sets():
    """by_language_and_definition: the four groups of off-diagonal pairs (same or different definition x same or other
    language) averaged by hand; absent where no two sets share a language; a set of unknown language in none."""
    sets = ["fr_a", "fr_b", "ar_a", "ar_b", "xx"]
    defs = {"fr_a": "hate", "fr_b": "hate", "ar_a": "hate", "ar_b": "offensive", "xx": "hate"}
    langs = {"fr_a": "fr", "fr_b": "fr", "ar_a": "ar", "ar_b": "ar", "xx": ""}
    acc = {(s, t): 0.4 + 0.01 * i for i, (s, t) in enumerate((s, t) for s in sets for t in sets)}
    cell = lambda s, t, k: {"balanced_accuracy": {"both-k5": acc[s, t] + k}, "f1": {"both-k5": 0.0}}  # noqa: E731
    matrix = {"sae": {s: {t: cell(s, t, 0) for t in sets} for s in sets},
              "control": {s: {t: cell(s, t, -0.1) for t in sets} for s in sets},
              "lexical": {s: {t: {"balanced_accuracy": acc[s, t] - 0.2, "f1": 0.0} for t in sets} for s in sets},
              "definitions": defs, "languages": langs}
    got = by_language_and_definition(matrix)
    expect = {"same definition, same language": [("fr_a", "fr_b"), ("fr_b", "fr_a")],
              "same definition, other language": [("fr_a", "ar_a"), ("ar_a", "fr_a"), ("fr_b", "ar_a"), ("ar_a", "fr_b")],
              "different definition, same language": [("ar_a", "ar_b"), ("ar_b", "ar_a")],
              "different definition, other language": [("fr_a", "ar_b"), ("ar_b", "fr_a"), ("fr_b", "ar_b"), ("ar_b", "fr_b")]}
    assert list(got) == list(expect)
    for group, pairs in expect.items():
        assert got[group]["pairs"] == len(pairs)
        assert got[group]["sae"]["both-k5"] == pytest.approx(np.mean([acc[p] for p in pairs]))
        assert got[group]["control"]["both-k5"] == pytest.approx(np.mean([acc[p] for p in pairs]) - 0.1)
        assert got[group]["lexical"] == pytest.approx(np.mean([acc[p] for p in pairs]) - 0.2)
    full = {**matrix, "by_definition": by_definition(matrix), "by_language_and_definition": got}
    table = format_transfer(full, rules=("both-k5",))
    assert "by language and label definition" in table and "different definition, same language (2 pairs)" in table
    section = by_definition_table(full, "both-k5")
    assert section.count("<table") == 2 and section.count("<tr>") == 3 + 5
    assert f"{got['same definition, other language']['sae']['both-k5']:.4g}" in section
    one_each = {**matrix, "languages": {"fr_a": "fr", "ar_b": "ar"}}
    assert by_language_and_definition(one_each) == {}


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def tox_env(tiny_qwen3, hate_sample, tmp_path_factory):
    root = tmp_path_factory.mktemp("tox")
    sae_dir = save_saes(random_saes(64, [0, 1, 2], model=str(tiny_qwen3)), root / "saes")
    rows = [{"text": t, "label": "toxic" if y else "clean", "templ_id": g[1:]}
            for t, y, g in zip(hate_sample.texts, hate_sample.labels, hate_sample.groups, strict=True)]
    return root, sae_dir, _write_csv(root / "labelled.csv", rows)


def test_mine_classify_eval_through_the_library(tox_env):
    """The application as a Python user runs it: each config's run returns a result whose figures agree with each
    other (the audit's decisions are the rule's predictions on the encoded texts) and whose text the CLI prints."""
    from saescope.apps.toxicity import ClassifyConfig, MineConfig, RulesEvalConfig, run_classify, run_mine, run_rules_eval

    root, sae_dir, data = tox_env
    mined = run_mine(MineConfig(sae=str(sae_dir), data=str(data), rule_k=[2, 1], out=str(root / "rules.json")))
    assert mined.path == root / "rules.json" and mined.path.is_file()
    assert [r.k for r in mined.rules.rules if r.kind == "layer"] == [1, 2]  # sizes sorted, each mined once
    assert mined.side.name.endswith("[mine]") and 0 < len(mined.side) < 160  # the mining side of the template split
    assert "layer chosen by top1-diff" in mined.text()
    classified = run_classify(ClassifyConfig(rules=str(root / "rules.json"), texts=str(data), label_column="label",
                                             audit=str(root / "audit.jsonl")))
    lines = [json.loads(x) for x in (root / "audit.jsonl").read_text().splitlines()]
    assert len(lines) == len(classified.predictions) == 160
    assert [r["decision"] == "positive" for r in lines] == classified.predictions
    rule = mined.rules.rule(None)
    for r in lines:  # each decision is the rule's on the features the record names (with weights: with its score)
        strongest = {(f["layer"], f["feature"]): {"max": max(t["activation"] for t in f["tokens"]), "mean": sum(
            t["activation"] for t in f["tokens"]) / f["kept_tokens"] if "kept_tokens" in f else None} for f in r["fired"]}
        weighs = rule.kind in ("sparse", "weighted", "mean", "both")
        assert ("score" in r) == weighs and all(("weight" in f or "terms" in f) == weighs for f in r["fired"])
        if weighs:  # the score is the bias plus what each named feature adds
            assert r["score"] == pytest.approx(rule.decide(strongest)[1], abs=1e-3) and (r["score"] > 0) == (r["decision"] == "positive")
        else:
            assert rule.decide(strongest)[0] == (r["decision"] == "positive")
    labelled = load_labelled(str(data))
    enc = encode_labelled(Scope.load(str(sae_dir), layers=rule.layers), labelled, residual=False, progress=False,
                          activations=rule.statistic is not None)
    assert classified.predictions == rule.predict(enc.hits["sae"]).tolist()  # the audit decides as the rule does
    assert classified.against_labels == scores(np.array(classified.predictions), labelled.labels)
    # a limit on a labelled set: a seeded sample, not the first rows (which are often all of one class)
    sampled = run_classify(ClassifyConfig(rules=str(root / "rules.json"), texts=str(data), label_column="label", limit=20,
                                          audit=str(root / "a20.jsonl")))
    texts = [json.loads(x)["text"] for x in (root / "a20.jsonl").read_text().splitlines()]
    assert len(sampled.predictions) == 20 and texts != [r["text"] for r in lines[:20]] and set(texts) <= {r["text"] for r in lines}
    ev = run_rules_eval(RulesEvalConfig(rules=str(root / "rules.json"), fractions=[0.5, 1.0], draws=2,
                                        json=str(root / "eval.json")))
    got = json.loads((root / "eval.json").read_text())
    assert ev.path == root / "eval.json" and got["sets"]["sae"]["rules"].keys() == ev.result["sets"]["sae"]["rules"].keys()
    assert "by template" in got["split"] and "lexical" in got["baselines"]
    assert set(got["curve"]["sae"]) == {"0.5", "1.0"} and got["curve"]["sae"]["0.5"]["f1"]["layer-k1"]["draws"] == 2
    assert ev.section == root / "report-section.html" and "Toxicity rules" in ev.section.read_text()
    # an evaluation under another name in the rules' folder gets its own section, which the run's report globs;
    # the main section (eval.json's) stays as it was
    main = ev.section.read_bytes()
    other = run_rules_eval(RulesEvalConfig(rules=str(root / "rules.json"), fractions=[1.0], draws=1,
                                           json=str(root / "eval-again.json")))
    assert other.section == root / "report-section-eval-again.html" and (root / "report-section.html").read_bytes() == main
    assert "eval-again.json" in other.section.read_text() and "balanced accuracy" in other.section.read_text()
    assert f"report section: {other.section}" in other.text()


def test_cli_prints_what_the_library_returns(tox_env):
    root, sae_dir, data = tox_env
    code, out, err = run_cli("toxicity", "mine", "--sae", str(sae_dir), "--data", str(data), "--rule-k", "1,2",
                             "--out", str(root / "cli-rules.json"))
    assert code == 0, err
    assert json.loads((root / "cli-rules.json").read_text())["rules"] == json.loads((root / "rules.json").read_text())["rules"]
    assert out.splitlines()[-1] == f"rules: {root / 'cli-rules.json'}" and "layer chosen by top1-diff" in out


def test_cli_bad_input_is_one_line_and_writes_nothing(tox_env, tmp_path):
    root, sae_dir, data = tox_env
    bad = _write_csv(tmp_path / "bad.csv", [{"text": "a", "label": "hateful"}, {"text": "b", "label": "perhaps"}])
    code, _, err = run_cli("toxicity", "mine", "--sae", str(sae_dir), "--data", str(bad), "--out", str(tmp_path / "r.json"))
    assert_one_line_error(code, err, "'perhaps'")
    small = _write_csv(tmp_path / "small.csv", [{"text": f"t{i}", "label": i % 2} for i in range(12)])
    code, _, err = run_cli("toxicity", "mine", "--sae", str(sae_dir), "--data", str(small), "--split", "all",
                           "--rule-k", "1,10", "--out", str(tmp_path / "r.json"))
    assert_one_line_error(code, err, "fewer than K=10")
    empty = _write_csv(tmp_path / "empty.csv", [{"text": "", "label": 1}, {"text": "b", "label": 0}])
    code, _, err = run_cli("toxicity", "mine", "--sae", str(sae_dir), "--data", str(empty), "--out", str(tmp_path / "r.json"))
    assert_one_line_error(code, err, "empty text")
    assert not (tmp_path / "r.json").exists()
    other = save_saes(random_saes(64, [0, 1, 2], seed=3, model=str(json.loads((root / "rules.json").read_text())["model"])),
                      tmp_path / "other")
    code, _, err = run_cli("toxicity", "classify", "--rules", str(root / "rules.json"), "--sae", str(other),
                           "--texts", "hello there", "--audit", str(tmp_path / "a.jsonl"))
    assert_one_line_error(code, err, "were mined on the SAEs")
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "a.jsonl.partial").exists()


# ---------------------------------------------------------------- natural posts (../shared/data/toxicity/natural)
def test_natural_sets_load_by_name_and_split_by_their_own_split():
    from saescope.apps.toxicity.run import mining_side
    from saescope.core.data.labelled import NATURAL, split_rule

    shared_file(SHARED / "toxicity" / "natural" / "en_olid.jsonl")
    olid = load_labelled("en_olid")
    assert (olid.language, olid.definition, len(olid), olid.counts()) == ("en", "offensive", 6000, (3000, 3000))
    mine, held = group_split(olid)
    # OLID's own test split (354 tweets: 191 clean, 163 offensive) is the held-out side, whatever the seed
    assert held.counts() == (191, 163) and set(held.splits) == {"test"} and set(mine.splits) == {"train"}
    assert group_split(olid, seed=7)[1].texts == held.texts and "own split (test rows" in split_rule(olid)
    # the report's sizes: at most 2,000 of each class mined, a seeded sample of the mining side
    side = mining_side(olid, "mine", 1.0, 0, 2000)
    assert side.counts() == (2000, 2000) and not set(side.texts) & set(held.texts)
    assert mining_side(olid, "mine", 1.0, 0, 2000).texts == side.texts != mining_side(olid, "mine", 1.0, 1, 2000).texts
    # HatEval-es has train and dev only: dev is held out; a set without splits falls back to the hash of its texts
    assert set(group_split(load_labelled("es_hateval2019"))[1].splits) == {"dev"}
    pt = load_labelled("pt_toldbr")
    assert pt.splits == () and "by text, a seeded hash" in split_rule(pt)
    assert set(NATURAL) >= {"en_olid", "de_germeval2018", "zh_cold", "ar_mlma"}


def test_mixing_label_definitions_warns_and_the_same_definition_does_not():
    from saescope.core.data.labelled import check_definitions

    shared_file(SHARED / "toxicity" / "natural" / "es_hateval2019.jsonl")
    olid, hasoc, hateval = (load_labelled(n) for n in ("en_olid", "en_hasoc2019", "es_hateval2019"))
    assert check_definitions([olid, hasoc]) is None
    warned = check_definitions([olid, hateval])
    assert "hate: es_hateval2019" in warned and "offensive: en_olid" in warned and "\n" not in warned


def test_natural_posts_mine_eval_transfer_and_classify_on_a_tiny_model(tiny_qwen3, tmp_path):
    """The report's protocol on natural data, end to end on random SAEs (the figures are chance; the plumbing is
    what is tested): 2 x K texts mined per class, the own test split held out, other sets scored beside it, the
    transfer matrix over natural sets, a definitions warning, and a sparse rule's audit (weights and score)."""
    from saescope.apps.toxicity import ClassifyConfig, MineConfig, RulesEvalConfig, run_classify, run_mine, run_rules_eval

    shared_file(SHARED / "toxicity" / "natural" / "en_olid.jsonl")
    sae_dir = save_saes(random_saes(64, [1, 2], model=str(tiny_qwen3)), tmp_path / "saes")
    mined = run_mine(MineConfig(sae=str(sae_dir), data="en_olid", per_class=30, rule_k=[1, 2], out=str(tmp_path / "r.json")))
    assert mined.side.counts() == (30, 30) and set(mined.side.splits) == {"train"}
    kinds = {r.kind for r in mined.rules.rules}
    assert kinds == {"layer", "multi", "sparse", "weighted", "mean", "both"} and mined.rules.mining["per_class"] == 30
    with pytest.warns(UserWarning, match="label different things as positive"):
        ev = run_rules_eval(RulesEvalConfig(rules=str(tmp_path / "r.json"), also=["es_hateval2019"], fractions=[1.0],
                                            draws=1, transfer=["de_germeval2018", "en_olid"]))
    got = ev.result
    assert got["evaluation"]["n_texts"] == 354 and "own split (test rows held out)" in got["split"]
    assert got["mining"]["n_texts"] == 60  # the same capped side the rules were mined on
    assert got["also"]["es_hateval2019"]["evaluation"]["n_texts"] == 500 and "dev rows" in got["also"]["es_hateval2019"]["split"]
    assert set(got["transfer"]["sae"]) == {"en_olid", "de_germeval2018"} and "offensive: " in got["warning"]
    assert "es_hateval2019" in ev.text() and "weighted-k" in ev.text() and "texts (positive) mined on" in ev.text()
    weighted = mined.rules.rule(next(r.name for r in mined.rules.rules if r.kind == "weighted"))
    run_classify(ClassifyConfig(rules=str(tmp_path / "r.json"), texts="fr_ftr_racism", limit=12, rule=weighted.name,
                                audit=str(tmp_path / "audit.jsonl")))
    records = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert len(records) == 12 and all("score" in r for r in records)
    assert all((r["score"] > 0) == (r["decision"] == "positive") for r in records)
    for r in records:  # a weighted audit names each feature's weight, scale, max activation and what it adds
        assert r["score"] == pytest.approx(weighted.bias + sum(f["contribution"] for f in r["fired"]), abs=1e-4)
        for f in r["fired"]:
            assert f["max_activation"] == max(t["activation"] for t in f["tokens"])
            assert f["contribution"] == pytest.approx(f["weight"] * f["max_activation"] / f["scale"], rel=1e-3, abs=1e-4)
    mean = mined.rules.rule(next(r.name for r in mined.rules.rules if r.kind == "mean"))
    run_classify(ClassifyConfig(rules=str(tmp_path / "r.json"), texts="fr_ftr_racism", limit=12, rule=mean.name,
                                audit=str(tmp_path / "mean.jsonl")))
    records = [json.loads(x) for x in (tmp_path / "mean.jsonl").read_text().splitlines()]
    assert all((r["score"] > 0) == (r["decision"] == "positive") for r in records)
    assert any(r["fired"] for r in records)
    for r in records:  # a mean audit: each feature's activations summed over its tokens, over the text's kept tokens
        assert r["score"] == pytest.approx(mean.bias + sum(f["contribution"] for f in r["fired"]), abs=1e-4)
        for f in r["fired"]:
            assert 0 < len(f["tokens"]) <= f["kept_tokens"] and "max_activation" not in f
            assert f["mean_activation"] == pytest.approx(sum(t["activation"] for t in f["tokens"]) / f["kept_tokens"],
                                                         abs=1e-3)
            assert f["contribution"] == pytest.approx(f["weight"] * f["mean_activation"] / f["scale"], rel=1e-3, abs=1e-4)
    both = mined.rules.rule(next(r.name for r in mined.rules.rules if r.kind == "both"))
    got = run_classify(ClassifyConfig(rules=str(tmp_path / "r.json"), texts="fr_ftr_racism", limit=12, rule=both.name,
                                      audit=str(tmp_path / "both.jsonl")))
    records = [json.loads(x) for x in (tmp_path / "both.jsonl").read_text().splitlines()]
    assert [r["decision"] == "positive" for r in records] == got.predictions and any(r["fired"] for r in records)
    for r in records:  # a both audit: per feature, one term per statistic the rule reads of it, each with its weight
        assert r["score"] == pytest.approx(both.bias + sum(f["contribution"] for f in r["fired"]), abs=1e-4)
        for f in r["fired"]:
            reads = [s for g, s in zip(both.features, both.reads, strict=True) if (g.layer, g.feature) == (f["layer"], f["feature"])]
            assert [t["statistic"] for t in f["terms"]] == reads
            assert f["contribution"] == pytest.approx(sum(t["contribution"] for t in f["terms"]), abs=1e-5)
            for t in f["terms"]:
                want = max(x["activation"] for x in f["tokens"]) if t["statistic"] == "max" else \
                    sum(x["activation"] for x in f["tokens"]) / f["kept_tokens"]
                assert t["activation"] == pytest.approx(want, abs=1e-3)
                assert t["contribution"] == pytest.approx(t["weight"] * t["activation"] / t["scale"], rel=1e-3, abs=1e-4)


def test_natural_bad_input_is_one_line(tiny_qwen3, tmp_path):
    shared_file(SHARED / "toxicity" / "natural" / "en_olid.jsonl")
    sae_dir = save_saes(random_saes(64, [1], model=str(tiny_qwen3)), tmp_path / "saes")
    code, _, err = run_cli("toxicity", "mine", "--sae", str(sae_dir), "--data", "en_olid", "--per-class", "4",
                           "--rule-k", "1,10", "--out", str(tmp_path / "r.json"))
    assert_one_line_error(code, err, "fewer than K=10")
    assert not (tmp_path / "r.json").exists()
    from saescope.apps.toxicity import RulesEvalConfig
    from saescope.core.errors import ParamError

    with pytest.raises(ParamError, match="unknown set 'klingon'"):
        RulesEvalConfig(rules="r.json", transfer=["natural", "klingon"]).languages()
    assert RulesEvalConfig(rules="r.json", transfer=["natural"]).languages()[:2] == ["en_olid", "de_germeval2018"]


def test_mine_with_a_control_keeps_the_encoding_that_eval_reads_back(tiny_qwen3, tmp_path, monkeypatch):
    """`mine --control`: each rule's CV figure beside the control's, and the mining side's encoding kept beside the
    rules; `eval` reads it back (one encode less) and scores exactly as when it encodes afresh; under another control
    it encodes afresh."""
    from saescope.apps.toxicity import MineConfig, RulesEvalConfig, run_mine, run_rules_eval
    from saescope.apps.toxicity import run as tox_run

    shared_file(SHARED / "toxicity" / "natural" / "en_olid.jsonl")
    sae_dir = save_saes(random_saes(64, [1, 2], model=str(tiny_qwen3)), tmp_path / "saes")
    control_dir = save_saes(random_saes(64, [1, 2], model=str(tiny_qwen3), seed=7), tmp_path / "control")
    other_dir = save_saes(random_saes(64, [1, 2], model=str(tiny_qwen3), seed=8), tmp_path / "other")
    rules = tmp_path / "r.json"
    mined = run_mine(MineConfig(sae=str(sae_dir), data="en_olid", per_class=30, rule_k=[1, 2], out=str(rules),
                                control=str(control_dir)))
    kept = tmp_path / "r.mining-encoded.npz"
    assert kept.is_file() and set(mined.rules.choice["cv_balanced_accuracy_control"]) >= {"layer-k1", "both-k2"}
    assert ", control 0." in mined.text()
    calls = []
    real = tox_run.encode_labelled
    monkeypatch.setattr(tox_run, "encode_labelled", lambda *a, **k: calls.append(a[1].name) or real(*a, **k))

    def evaluate(control: Path) -> dict:
        calls.clear()
        got = run_rules_eval(RulesEvalConfig(rules=str(rules), control=str(control), fractions=[0.5, 1.0], draws=2,
                                             json=str(tmp_path / "e.json"))).result
        return {k: v for k, v in got.items() if k != "control_path"}

    cached = evaluate(control_dir)
    assert len(calls) == 1 and "[eval]" in calls[0]  # only the held-out side was encoded
    kept.rename(tmp_path / "aside.npz")
    fresh = evaluate(control_dir)
    assert len(calls) == 2 and fresh == cached
    (tmp_path / "aside.npz").rename(kept)
    evaluate(other_dir)
    assert len(calls) == 2  # another control: its encoding is not the kept one
    assert mined.rules.model_dtype == cached["model_dtype"] == "fp32"
    # rules mined in bf16 are evaluated in bf16 when no dtype is asked for, reading back their kept encoding
    run_mine(MineConfig(sae=str(sae_dir), data="en_olid", per_class=30, rule_k=[1, 2], out=str(rules),
                        control=str(control_dir), model_dtype="bf16"))
    assert RuleSet.load(rules).model_dtype == "bf16"
    assert evaluate(control_dir)["model_dtype"] == "bf16" and len(calls) == 1


def test_an_encoding_is_read_back_only_under_its_key(tmp_path):
    from saescope.api.hits import EncodedSet, load_encoded, save_encoded
    from saescope.core.data.labelled import LabelledSet

    table = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0]], dtype=bool)
    means = {3: np.array([[0.5, 0, 0.25], [0, 2.0, 1.0], [0.75, 0.5, 0]])}
    data = LabelledSet("three", ["a", "b", "c"], np.array([1, 0, 1]), ["a", "b", "c"], [""] * 3)
    import torch

    maxima = np.array([[1.5, 0, 0.5], [0, 3.0, 2.0], [1.0, 0.75, 0]])  # a float table: activations too
    enc = EncodedSet(data, {"sae": hits_of({3: maxima}, means), "control": hits_of({3: ~table})},
                     {3: torch.arange(6, dtype=torch.float16).reshape(3, 2)})
    path = tmp_path / "enc.npz"
    save_encoded(path, enc, {"data": "h", "sae": {"3": "f"}})
    back = load_encoded(path, data, {"data": "h", "sae": {"3": "f"}})
    assert back is not None and set(back.hits) == {"sae", "control"} and torch.equal(back.residual[3], enc.residual[3])
    for name in ("sae", "control"):
        assert np.array_equal(back.hits[name].layer(3), enc.hits[name].layer(3))
    for statistic in ("max", "mean"):
        assert np.array_equal(back.hits["sae"].activations[3].columns([0, 1, 2], statistic),
                              enc.hits["sae"].activations[3].columns([0, 1, 2], statistic))
    assert load_encoded(path, data, {"data": "other", "sae": {"3": "f"}}) is None  # another key
    assert load_encoded(path, data.subset(np.array([True, True, False]), "two"), {"data": "h", "sae": {"3": "f"}}) is None
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # a zip cut short
    assert load_encoded(path, data, {"data": "h", "sae": {"3": "f"}}) is None
    path.write_bytes(b"not an npz")
    assert load_encoded(path, data, {"data": "h", "sae": {"3": "f"}}) is None
    assert load_encoded(tmp_path / "none.npz", data, {}) is None
