"""Sparse probing: the classifiers against hand-computed answers, the real tasks' splits, and the whole pass on a
tiny model (SAE, control and dense probe from the same LM passes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tests.conftest import SHARED, random_saes

from saescope.api.probing import (
    ProbeSet,
    best_threshold_accuracy,
    format_probing,
    logistic_accuracy,
    probe_sets,
    sparse_probing,
    top_latents,
)
from saescope.api.scope import Scope
from saescope.core.errors import SaescopeError
from saescope.core.models import load_model


def _t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_best_threshold_by_hand():
    # train: class 1 above 2.5; the rule x > 2 classifies it perfectly
    assert best_threshold_accuracy(_t(1, 2, 3, 4), _t(0, 0, 1, 1), _t(2.5, 1.5, 10, 2), _t(1, 0, 1, 0)) == 1.0
    # the other side: class 1 below, so x <= 2; test 2.5 -> 0 (wrong), 1.5 -> 1, 10 -> 0, 2 -> 1
    assert best_threshold_accuracy(_t(1, 2, 3, 4), _t(1, 1, 0, 0), _t(2.5, 1.5, 10, 2), _t(1, 1, 0, 1)) == 0.75
    # no threshold splits equal values: with train (0,0,0,1) labelled (0,1,1,1), x > 0 gets 2 of 4 and calling
    # everything class 1 gets 3 of 4, so that is the rule; the test pair (0 -> 0, 5 -> 1) then scores 0.5
    assert best_threshold_accuracy(_t(0, 0, 0, 1), _t(0, 1, 1, 1), _t(0, 5), _t(0, 1)) == 0.5


def test_logistic_regression_separates_and_does_not_invent():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g, dtype=torch.float64)
    y = (x[:, 2] > 0).double()
    assert logistic_accuracy(x[:300], y[:300], x[300:], y[300:]) >= 0.95
    noise = (torch.rand(400, generator=g) > 0.5).double()  # labels independent of x
    assert 0.35 <= logistic_accuracy(x[:300], noise[:300], x[300:], noise[300:]) <= 0.65


def test_top_latents_rank_by_absolute_mean_difference():
    x = _t(0, 5, 1, 0, 5, 1, 9, 5, 0, 9, 5, 0).reshape(4, 3)  # column 2 falls by 1, column 0 rises by 9
    y = _t(0, 0, 1, 1)
    assert top_latents(x, y, 2).tolist() == [0, 2]


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs the shared reference data (../shared/data)")
def test_real_tasks_are_balanced_and_split_by_group():
    sets = {s.name: s for s in probe_sets(per_class=60, seed=3)}
    assert set(sets) == {"hatecheck_en", "mgsm_en_fr", "mgsm_de_es", "math_vs_mmlu", "mmlu_stem_vs_humanities"}
    for s in sets.values():
        assert len(s.texts) == 120 and s.labels.sum() == 60 and all(s.texts)
        for side in (s.test, ~s.test):
            assert 0 < s.labels[side].sum() < side.sum()  # both classes on both sides
        side_of = {}
        for g, t in zip(s.groups, s.test):
            assert side_of.setdefault(g, t) == t, f"{s.name}: group {g} on both sides"
        assert 0.15 < s.test.mean() < 0.45
    hate = sets["hatecheck_en"]
    import csv

    gold = {r["test_case"].strip(): r["label_gold"] for r in csv.DictReader(open(SHARED / "toxicity" / "hatecheck_en.csv"))}
    assert [gold[t] == "hateful" for t in hate.texts] == [bool(y) for y in hate.labels]
    assert probe_sets(["mgsm_en_fr"], per_class=60, seed=3)[0].texts == sets["mgsm_en_fr"].texts  # seeded
    with pytest.raises(SaescopeError, match="unknown probe task 'nope'"):
        probe_sets(["nope"])
    with pytest.raises(SaescopeError, match="fewer than per_class"):
        probe_sets(["mgsm_en_fr"], per_class=300)


def test_the_whole_pass_on_a_tiny_model(tiny_qwen3):
    scope = Scope(load_model(str(tiny_qwen3)), random_saes(64, [0, 2]))
    control = random_saes(64, [0, 2], seed=7)
    words_a = ["apple banana cherry", "banana cherry apple", "cherry apple banana grape"]
    words_b = ["seven eight nine", "nine eight seven", "eight seven nine ten"]
    texts = [words_a[i % 3] + f" {i}" for i in range(30)] + [words_b[i % 3] + f" {i}" for i in range(30)]
    labels = np.array([0] * 30 + [1] * 30)
    test = np.array([i % 4 == 0 for i in range(60)])  # every template on both sides
    ps = ProbeSet("fruit_vs_numbers", "toy", texts, labels, [str(i) for i in range(60)], test)
    result = sparse_probing(scope, [ps], control=control, progress=False)
    layer = result["tasks"]["fruit_vs_numbers"]["layers"]["2"]
    assert layer["dense"] == 1.0  # the residual stream separates two disjoint vocabularies
    for name in ("sae", "control"):
        assert 0.0 <= layer[name]["top1"] <= 1.0 and 0 <= layer[name]["top1_latent"] < 64
    assert result["mean_over_tasks"]["0"]["sae_top1"] == result["tasks"]["fruit_vs_numbers"]["layers"]["0"]["sae"]["top1"]
    assert "ctl top1" in format_probing(result)
    with pytest.raises(SaescopeError, match="holds one class only"):
        ProbeSet("bad", "", texts, labels, [str(i) for i in range(60)], labels == 1)


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs the shared reference data (../shared/data)")
def test_quality_command_end_to_end(tiny_sae_dir, tmp_path):
    import json

    from saescope.cli import main

    assert main(["control", "random", "--like", str(tiny_sae_dir), "--out", str(tmp_path / "ctl")]) == 0
    out = tmp_path / "q.json"
    assert main(["quality", "--sae", str(tiny_sae_dir), "--control", str(tmp_path / "ctl"), "--control", str(tiny_sae_dir),
                 "--tasks", "mgsm_en_fr,hatecheck_en",
                 "--per-class", "20", "--fvu-tokens", "256", "--layers", "0,2", "--absorption-words", "150", "--out", str(out),
                 "--model-dtype", "bf16"]) == 0
    report = json.loads(out.read_text())
    assert report["model_dtype"] == "bf16"  # the LM the figures were read from, as asked
    assert set(report["layers"]) == {"0", "2"} and set(report["probing"]["tasks"]) == {"mgsm_en_fr", "hatecheck_en"}
    row = report["layers"]["2"]
    for key in ("sae_top1", "control_top1", "sae_top5", "dense", "sae_fvu_in_domain", "sae_fvu_math", "sae_fvu_code",
                "sae_fvu_multilingual", "control_fvu_in_domain", "top1_margin", "top1_margin_se", "letter_probe_f1",
                "sae_absorption", "control_absorption", "sae_letter_main_f1"):
        assert isinstance(row[key], float), key
    assert row["top1_margin"] == pytest.approx(row["sae_top1"] - row["control_top1"])  # paired: the same test texts
    # the row is the mean over the tasks of the per-task figures
    per_task = [t["layers"]["2"]["sae"]["top1"] for t in report["probing"]["tasks"].values()]
    assert row["sae_top1"] == pytest.approx(sum(per_task) / 2)
    assert row["decoder_cos_to_init"] is None  # not a training run: nothing recorded
    # every control's margins: the random one's top-1 margin is the table's; the SAEs as their own control give 0
    first, itself = report["margins"]
    assert (first["control"], first["kind"], itself["kind"]) == (str(tmp_path / "ctl"), "random", "not a control")
    assert first["layers"]["2"]["top1"] == row["top1_margin"] and first["layers"]["2"]["top1_se"] == row["top1_margin_se"]
    assert first["layers"]["2"]["top5"] == pytest.approx(row["sae_top5"] - row["control_top5"])
    assert first["layers"]["2"]["fvu_in_domain"] == pytest.approx(row["control_fvu_in_domain"] - row["sae_fvu_in_domain"])
    for n, m in itself["layers"].items():  # absorption is NaN on the tiny model (no letter is probed right): NaN - NaN
        nan_ok = math.isnan(report["layers"][n]["sae_absorption"])
        assert all(v == 0 or (nan_ok and math.isnan(v)) for v in m.values()), json.dumps(m)


def test_paired_margin_by_hand():
    from saescope.api.probing import paired_margin

    a = [torch.tensor([True, True, False, True]), torch.tensor([True, False])]
    b = [torch.tensor([False, True, False, False]), torch.tensor([True, True])]
    margin, se = paired_margin(a, b)
    # task 1: differences 1,0,0,1 (mean .5, unbiased variance 1/3); task 2: 0,-1 (mean -.5, variance 1/2)
    assert margin == pytest.approx((0.5 - 0.5) / 2)
    assert se == pytest.approx(((1 / 3) / 4 + 0.5 / 2) ** 0.5 / 2)


def test_one_vs_rest_logistic_columns_fit_as_if_alone():
    from saescope.api.probing import fit_logistic

    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 6, generator=g) * torch.tensor([1.0, 5, 0.2, 1, 1, 3])
    y = torch.stack([(x[:, 0] + 0.3 * torch.randn(80, generator=g)) > 0, x[:, 1] > 2], 1).long()
    joint = fit_logistic(x, y, balanced=True, tol=1e-9)
    for c in range(2):
        alone = fit_logistic(x, y[:, c], balanced=True, tol=1e-9)
        torch.testing.assert_close(joint.scores(x)[:, c], alone.scores(x)[:, 0], atol=1e-3, rtol=1e-3)  # L-BFGS tolerance
        # sklearn's stopping rule (the default) stops a little earlier, and not much further away
        sklearn_like = fit_logistic(x, y[:, c], balanced=True)
        torch.testing.assert_close(sklearn_like.scores(x)[:, 0], alone.scores(x)[:, 0], atol=0.05, rtol=0.02)
    # raw-space weights: the scores of x are those of the standardised fit, so the weight row is a direction of x's space
    assert joint.weight.shape == (2, 6) and ((joint.scores(x)[:, 0] > 0).long() == y[:, 0]).double().mean() > 0.85


@pytest.mark.parametrize("balanced", [False, True])
def test_newtons_fit_is_the_optimum_lbfgs_approaches(balanced, monkeypatch):
    """A few features go by Newton's method, many by L-BFGS: on the same problem both reach the one optimum (the loss
    is strictly convex), Newton's to float64 precision; and its gradient there is zero."""
    import saescope.api.probing as probing

    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 5, generator=g) * torch.tensor([1.0, 4, 0.3, 2, 1])
    y = torch.stack([(x[:, 0] - x[:, 2] + 0.5 * torch.randn(300, generator=g)) > 0.3, x[:, 1] > 3], 1).long()
    newton = probing.fit_logistic(x, y, balanced=balanced)
    monkeypatch.setattr(probing, "NEWTON_MAX_FEATURES", 0)
    lbfgs = probing.fit_logistic(x, y, balanced=balanced, tol=1e-10)
    torch.testing.assert_close(newton.scores(x), lbfgs.scores(x), atol=2e-3, rtol=1e-3)
    # the gradient of the standardised problem at Newton's answer, by autograd
    mean, std = x.double().mean(0), x.double().std(0)
    w = (newton.weight * std).requires_grad_(True)
    b = (newton.bias + newton.weight @ mean).detach().requires_grad_(True)
    yd = y.double()
    pos = yd.mean(0)
    weights = torch.where(yd == 1, 0.5 / pos, 0.5 / (1 - pos)) if balanced else torch.ones_like(yd)
    loss = probing._logistic_loss((x.double() - mean) / std, yd, weights, 1 / 300, w, b).sum()
    loss.backward()
    assert float(w.grad.abs().max()) < 1e-8 and float(b.grad.abs().max()) < 1e-8


def test_newtons_fit_survives_a_column_with_one_class_and_a_constant_feature():
    from saescope.api.probing import fit_logistic

    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(2))
    probe = fit_logistic(x, torch.zeros(40), balanced=True)
    assert torch.isfinite(probe.weight).all() and bool((probe.scores(x) < 0).all())
    # unpenalised, with a feature that never varies: its weight stays 0, the others separate as they can
    x[:, 1] = 3.0
    y = (x[:, 0] > 0).long()
    probe = fit_logistic(x, y, l2=0.0)
    assert torch.isfinite(probe.weight).all() and float(probe.weight[0, 1]) == 0.0
    assert bool(((probe.scores(x)[:, 0] > 0).long() == y).all())
