"""Sparse probing, as SAEBench defines it, on real labelled text: do single SAE latents carry concepts a person
can name, better than the random control's directions do?

Per task and layer, every text's SAE activations are mean-pooled over its tokens (position 0, the attention sink,
left out) and split into train and test by group (a HateCheck template, an MGSM problem: a group never sits on
both sides). Latents are ranked by the absolute difference of the class means on the train split; then

    top-1   the best latent with the threshold (and side) that classifies the train split best, scored on test
    top-5   a logistic regression on the 5 best latents (standardised on train), scored on test
    dense   a logistic regression on the mean-pooled residual stream itself: the ceiling a linear reader reaches

Tasks (real labels from the shared reference data; none of this text is in the training corpora):
    hatecheck_en             HateCheck (English) hateful vs non-hateful test cases, split by template
    mgsm_en_fr, mgsm_de_es   MGSM language identification: the same problems in two languages, split by problem
    math_vs_mmlu             MATH problems vs MMLU questions (domain)
    mmlu_stem_vs_humanities  MMLU questions from STEM subjects vs from humanities subjects
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from saescope.api.controls import named_controls
from saescope.api.scope import Scope
from saescope.core.data.benchmarks import shared_data_dir
from saescope.core.data.labelled import in_test_split
from saescope.core.data.rows import iter_rows
from saescope.core.errors import SaescopeError
from saescope.core.sae import SAE

TEST_SHARE = 0.3
STEM = ("abstract_algebra", "astronomy", "college_chemistry", "college_computer_science", "college_mathematics",
        "college_physics", "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_chemistry",
        "high_school_computer_science", "high_school_mathematics", "high_school_physics", "high_school_statistics",
        "machine_learning")
HUMANITIES = ("formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
              "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios", "philosophy",
              "prehistory", "professional_law", "world_religions")


@dataclass(frozen=True)
class ProbeSet:
    """A binary task: texts, labels (0/1), their groups, and which texts are on the test side (whole groups)."""

    name: str
    description: str
    texts: list[str]
    labels: np.ndarray
    groups: list[str]
    test: np.ndarray  # bool

    def __post_init__(self) -> None:
        for side, mask in (("train", ~self.test), ("test", self.test)):
            if len(set(self.labels[mask].tolist())) < 2:
                raise SaescopeError(f"probe task {self.name}: the {side} split holds one class only; use more texts per class")


Examples = list[tuple[str, int, str]]  # (text, label, group)


def _hatecheck(root: Path) -> Examples:
    rows = iter_rows(root / "toxicity" / "hatecheck_en.csv", require="test_case")
    return [(r["test_case"].strip(), int(r["label_gold"] == "hateful"), f"t{r['templ_id']}") for _, r in rows]


def _mgsm(a: str, b: str) -> Callable[[Path], Examples]:
    def build(root: Path) -> Examples:
        out: Examples = []
        for label, lang in enumerate((a, b)):
            path = root / "multilingual" / "mgsm" / f"mgsm_{lang}.tsv"
            out += [(r["question"], label, f"p{i}") for i, (_, r) in enumerate(iter_rows(path, columns=("question", "answer")))]
        return out
    return build


def _mmlu_questions(root: Path, subjects: tuple[str, ...], label: int) -> Examples:
    out: Examples = []
    for subject in subjects:
        for where, r in iter_rows(root / "benchmarks" / "mmlu" / f"{subject}_test.csv", require="question"):
            out.append((r["question"].strip(), label, f"{subject}:{where}"))
    return out


def _math_vs_mmlu(root: Path) -> Examples:
    math_rows = [(r["context"].strip(), 0, f"math:{w}") for w, r in iter_rows(root / "benchmarks" / "math.jsonl", require="context")]
    return math_rows + _mmlu_questions(root, STEM + HUMANITIES, 1)


def _stem_vs_humanities(root: Path) -> Examples:
    return _mmlu_questions(root, STEM, 0) + _mmlu_questions(root, HUMANITIES, 1)


TASKS: dict[str, tuple[str, Callable[[Path], Examples]]] = {
    "hatecheck_en": ("HateCheck (en): hateful vs non-hateful, split by template", _hatecheck),
    "mgsm_en_fr": ("MGSM: English vs French, same problems, split by problem", _mgsm("en", "fr")),
    "mgsm_de_es": ("MGSM: German vs Spanish, same problems, split by problem", _mgsm("de", "es")),
    "math_vs_mmlu": ("MATH problems vs MMLU questions", _math_vs_mmlu),
    "mmlu_stem_vs_humanities": ("MMLU: STEM vs humanities subjects", _stem_vs_humanities),
}


def probe_sets(names: list[str] | None = None, *, per_class: int = 100, seed: int = 0,
               shared_data: str | Path | None = None) -> list[ProbeSet]:
    """The probe tasks, each with `per_class` texts per class (a seeded sample, balanced) and its group split."""
    names = names or list(TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise SaescopeError(f"unknown probe task {unknown[0]!r}; known: {', '.join(TASKS)}")
    root = shared_data_dir(shared_data)
    sets = []
    for name in names:
        description, build = TASKS[name]
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])  # a task's sample does not depend on the others
        examples = [e for e in build(root) if e[0]]
        chosen: Examples = []
        for label in (0, 1):
            pool = [e for e in examples if e[1] == label]
            if len(pool) < per_class:
                raise SaescopeError(f"probe task {name}: {len(pool)} texts of class {label}, fewer than per_class={per_class}")
            chosen += [pool[i] for i in sorted(rng.choice(len(pool), per_class, replace=False))]
        groups = [g for _, _, g in chosen]
        sets.append(ProbeSet(name, description, [t for t, _, _ in chosen], np.array([y for _, y, _ in chosen]), groups,
                             np.array([in_test_split(g, seed, TEST_SHARE) for g in groups])))
    return sets


# ---------------------------------------------------------------- the classifiers


def best_threshold_correct(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor) -> Tensor:
    """Per test text, whether the single-feature rule `x > t` (or `x <= t`) whose threshold and side classify the
    train split best (ties: the lowest threshold) gets it right (bool)."""
    order = torch.argsort(train_x, stable=True)
    xs, ys = train_x[order], train_y[order].double()
    n = len(xs)
    # Rule "x > t" with t between positions i-1 and i: correct = negatives below + positives at or above.
    neg_below = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(1 - ys, 0)])
    pos_above = ys.sum() - torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(ys, 0)])
    correct_gt = neg_below + pos_above  # (n + 1,): split before position i
    # A split between equal values is not a threshold: only positions where the value changes (and the ends) count.
    valid = torch.ones(n + 1, dtype=torch.bool)
    valid[1:n] = xs[1:] != xs[:-1]
    correct = torch.stack([correct_gt, n - correct_gt])  # side 0: x > t is class 1; side 1: x <= t is class 1
    correct[:, ~valid] = -1
    side, split = divmod(int(torch.argmax(correct.flatten())), n + 1)
    t = xs[split - 1] if split > 0 else xs[0] - 1
    pred = test_x > t if side == 0 else test_x <= t
    return pred.double() == test_y.double()


def best_threshold_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor) -> float:
    """Test accuracy of the best single-threshold rule on the train split (`best_threshold_correct`)."""
    return float(best_threshold_correct(train_x, train_y, test_x, test_y).double().mean())


@dataclass(frozen=True)
class LinearProbe:
    """Linear scores x @ weight.T + bias in the input's own space: weight (c, d), bias (c,)."""

    weight: Tensor
    bias: Tensor

    def scores(self, x: Tensor) -> Tensor:
        return x.double() @ self.weight.T + self.bias


NEWTON_MAX_FEATURES = 64  # up to this many features a fit is solved by Newton's method (a (d+1)^2 system per column)


def fit_logistic(train_x: Tensor, train_y: Tensor, *, l2: float | None = None, balanced: bool = False,
                 tol: float = 1e-4) -> LinearProbe:
    """L2-regularised logistic regressions, one per column of train_y ((n,) or (n, c) of 0/1: one-vs-rest), fit on the
    standardised train split and returned in the raw input space (so that a weight row is a direction of that space).
    l2 defaults to 1/n_train (sklearn's C=1); `balanced` weighs each column's positives and negatives equally
    (sklearn's class_weight="balanced").

    Up to NEWTON_MAX_FEATURES features (sparse probes, rules, main latents: thousands of fits in `saescope quality`)
    the exact optimum, by damped Newton steps (a few batched solves instead of an L-BFGS run's hundreds of Python-level
    steps: 5.8 -> ~0.5 s of the quality suite's absorption); wider inputs (dense probes) by L-BFGS, stopped at `tol`
    on the largest gradient entry (sklearn's rule)."""
    y = train_y.double()
    y = y[:, None] if y.dim() == 1 else y
    mean, std = train_x.double().mean(0), train_x.double().std(0).clamp_min(1e-6)
    x = (train_x.double() - mean) / std
    l2 = 1.0 / len(y) if l2 is None else l2
    if balanced:
        pos = y.mean(0).clamp(1e-6, 1 - 1e-6)
        weights = torch.where(y == 1, 0.5 / pos, 0.5 / (1 - pos))
    else:
        weights = torch.ones_like(y)
    fit = _newton_logistic if x.shape[1] <= NEWTON_MAX_FEATURES else _lbfgs_logistic
    w, b = fit(x, y, weights, l2, tol)
    return LinearProbe(w / std, b - (w / std) @ mean)


def _logistic_loss(x: Tensor, y: Tensor, weights: Tensor, l2: float, w: Tensor, b: Tensor) -> Tensor:
    """Per column: the mean weighted cross-entropy + l2/2 |w|^2 (the bias is not penalised)."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x @ w.T + b, y, reduction="none")
    return (weights * bce).mean(0) + 0.5 * l2 * (w * w).sum(1)


def _lbfgs_logistic(x: Tensor, y: Tensor, weights: Tensor, l2: float, tol: float) -> tuple[Tensor, Tensor]:
    w = torch.zeros(y.shape[1], x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    # tol is sklearn's stopping rule (1e-4 on the largest gradient entry): 5-6x fewer iterations than 1e-9 on the
    # 26-letter probe of `saescope quality`, its test F1 within 0.001 (bench/RESULTS.md, "Speed of the demo").
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=200, tolerance_grad=tol, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = _logistic_loss(x, y, weights, l2, w, b).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _newton_logistic(x: Tensor, y: Tensor, weights: Tensor, l2: float, tol: float,
                     max_steps: int = 100) -> tuple[Tensor, Tensor]:
    """Every column at once: theta = (w, b) per column, Newton's step on the (d+1, d+1) Hessian, halved until the
    column's loss goes down (a column whose classes a threshold separates would otherwise overshoot). Stops when every
    gradient entry is below min(tol, 1e-8) or no step lowers the loss (the optimum to float64's precision)."""
    n, d = x.shape
    c = y.shape[1]
    xb = torch.cat([x, x.new_ones(n, 1)], 1)  # (n, d + 1): the bias as a last, unpenalised feature
    penalty = torch.full((d + 1,), l2, dtype=torch.float64)
    penalty[d] = 0
    theta = torch.zeros(c, d + 1, dtype=torch.float64)
    loss_of = lambda t: _logistic_loss(x, y, weights, l2, t[:, :d], t[:, d])  # noqa: E731
    loss = loss_of(theta)
    for _ in range(max_steps):
        p = torch.sigmoid(xb @ theta.T)  # (n, c)
        grad = ((weights * (p - y)).T @ xb) / n + penalty * theta  # (c, d + 1)
        if float(grad.abs().max()) < min(tol, 1e-8):
            break
        curvature = weights * p * (1 - p) / n  # (n, c)
        # a tiny ridge keeps the system solvable where the curvature vanishes (a column with one class, a constant
        # feature with l2 = 0): such a coordinate's gradient is zero or its step is cut back by the line search
        hessian = torch.einsum("nc,ni,nj->cij", curvature, xb, xb) + torch.diag(penalty + 1e-12)
        step = torch.linalg.solve(hessian, grad.unsqueeze(-1)).squeeze(-1)
        scale = torch.ones(c, 1, dtype=torch.float64)
        for _ in range(40):
            trial = theta - scale * step
            trial_loss = loss_of(trial)
            worse = ~(trial_loss <= loss)
            if not bool(worse.any()):
                break
            scale[worse] /= 2
        moved = trial_loss < loss
        if not bool(moved.any()):
            break
        theta = torch.where(moved[:, None], trial, theta)
        loss = torch.minimum(trial_loss, loss)
    return theta[:, :d], theta[:, d]


def logistic_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *, l2: float | None = None) -> float:
    """Test accuracy of an L2-regularised logistic regression fit on the standardised train split (`fit_logistic`)."""
    scores = fit_logistic(train_x, train_y, l2=l2).scores(test_x)[:, 0]
    return float(((scores > 0).double() == test_y.double()).double().mean())


def top_latents(train_x: Tensor, train_y: Tensor, k: int) -> Tensor:
    """The k latents with the largest absolute difference of class means on the train split."""
    diff = (train_x[train_y == 1].mean(0) - train_x[train_y == 0].mean(0)).abs()
    return torch.topk(diff, min(k, diff.numel())).indices


def probe_layer(pooled: Tensor, labels: np.ndarray, test: np.ndarray) -> dict:
    """top-1 and top-5 accuracy of one layer's pooled SAE activations (n_texts, d_sae); `top1_correct` and
    `top5_correct`, the per-test-text outcomes, let two SAE sets be compared text by text (paired)."""
    y, te = torch.as_tensor(labels), torch.as_tensor(test)
    x = pooled.double().cpu()
    xtr, ytr, xte, yte = x[~te], y[~te], x[te], y[te]
    best = top_latents(xtr, ytr, 5)
    correct = best_threshold_correct(xtr[:, best[0]], ytr, xte[:, best[0]], yte)
    correct5 = (fit_logistic(xtr[:, best], ytr).scores(xte[:, best])[:, 0] > 0).double() == yte.double()
    return {"top1": float(correct.double().mean()), "top5": float(correct5.double().mean()),
            "top1_latent": int(best[0]), "top1_correct": correct, "top5_correct": correct5}


def paired_margin(a: list[Tensor], b: list[Tensor]) -> tuple[float, float]:
    """Mean over tasks of accuracy(a) - accuracy(b) on the same test texts, and its standard error from the
    per-text differences (paired: both sets classify the same texts, so text difficulty cancels)."""
    diffs = [x.double() - y.double() for x, y in zip(a, b, strict=True)]
    margin = sum(float(d.mean()) for d in diffs) / len(diffs)
    var = sum(float(d.var(unbiased=True)) / len(d) if len(d) > 1 else 0.0 for d in diffs)
    return margin, math.sqrt(var) / len(diffs)


def sparse_probing(scope: Scope, sets: list[ProbeSet], *, control: dict[int, SAE] | None = None,
                   controls: dict[str, dict[int, SAE]] | None = None, layers: list[int] | None = None,
                   max_length: int = 128, batch_size: int = 32, progress: bool = True) -> dict:
    """Per task and layer: top-1 / top-5 accuracy of the SAEs (and of each control, on the same LM passes: `control`,
    or several by name in `controls`, the first named "control") and the dense probe's accuracy, with each control's
    paired margins. Returns a JSON-ready dict with per-layer means over the tasks."""
    layers = scope.check_layers(layers)
    controls = named_controls(control, controls)
    sae_sets = {"sae": {n: scope.saes[n] for n in layers}, **{name: {n: c[n] for n in layers} for name, c in controls.items()}}
    tasks = {}
    # per set and layer: each task's top-1 and top-5 outcome per test text
    outcomes: dict[tuple[str, int], list[Tensor]] = {}
    outcomes5: dict[tuple[str, int], list[Tensor]] = {}
    for ps in sets:
        n_texts = len(ps.texts)
        pooled: dict[str, dict[int, Tensor]] = {}
        for idx, got in scope.iter_pooled(ps.texts, layers=layers, pool="mean", batch_size=batch_size, max_length=max_length,
                                          skip_first_token=True, sae_sets=sae_sets, with_residual=True,
                                          progress=progress, desc=f"probe {ps.name}"):
            for name, per_layer in got.items():
                for n, rows in per_layer.items():
                    out = pooled.setdefault(name, {}).setdefault(n, rows.new_zeros(n_texts, rows.shape[1]).cpu())
                    out[torch.as_tensor(idx)] = rows.cpu()
        y, te = torch.as_tensor(ps.labels), torch.as_tensor(ps.test)
        per_layer_result = {}
        for n in layers:
            res = pooled["residual"][n].double()
            entry = {"dense": logistic_accuracy(res[~te], y[~te], res[te], y[te])}
            for name in sae_sets:
                entry[name] = probe_layer(pooled[name][n], ps.labels, ps.test)
                outcomes.setdefault((name, n), []).append(entry[name].pop("top1_correct"))
                outcomes5.setdefault((name, n), []).append(entry[name].pop("top5_correct"))
            per_layer_result[str(n)] = entry
        tasks[ps.name] = {"description": ps.description, "n_train": int((~ps.test).sum()), "n_test": int(ps.test.sum()),
                          "layers": per_layer_result}
    summary = {}
    for n in layers:
        row = {"dense": _mean(t["layers"][str(n)]["dense"] for t in tasks.values())}
        for name in sae_sets:
            for metric in ("top1", "top5"):
                row[f"{name}_{metric}"] = _mean(t["layers"][str(n)][name][metric] for t in tasks.values())
            # the binomial standard error of that mean (test texts are few: differences below ~2 of these are noise)
            row[f"{name}_top1_se"] = math.sqrt(sum(t["layers"][str(n)][name]["top1"] * (1 - t["layers"][str(n)][name]["top1"])
                                                   / t["n_test"] for t in tasks.values())) / len(tasks)
        for name in controls:
            row[f"{name}_margin_top1"], row[f"{name}_margin_top1_se"] = paired_margin(outcomes["sae", n], outcomes[name, n])
            row[f"{name}_margin_top5"], row[f"{name}_margin_top5_se"] = paired_margin(outcomes5["sae", n], outcomes5[name, n])
        if "control" in controls:  # the first control's top-1 margin under the names files have always had
            row["top1_margin"], row["top1_margin_se"] = row["control_margin_top1"], row["control_margin_top1_se"]
        summary[str(n)] = row
    return {"tasks": tasks, "mean_over_tasks": summary, "max_length": max_length,
            "definition": "SAEBench sparse probing: mean-pooled latents (position 0 left out), ranked by |class-mean "
                          "difference| on train; top-1 best-threshold and top-5 logistic accuracy on a group split"}


def _mean(values) -> float:
    v = list(values)
    return sum(v) / len(v) if v else math.nan


def format_probing(result: dict) -> str:
    """Per layer: the mean over tasks of top-1 and top-5 accuracy (SAE, control) and the dense ceiling."""
    rows = result["mean_over_tasks"]
    has_control = any("control_top1" in r for r in rows.values())
    ctl_head = f" {'ctl top1':>9} {'ctl top5':>9} {'margin':>7} {'± se':>6}" if has_control else ""
    head = f"{'layer':>5} {'top1':>7} {'± se':>6} {'top5':>7}{ctl_head} {'dense':>7}"
    lines = [f"sparse probing, mean accuracy over {len(result['tasks'])} tasks ({', '.join(result['tasks'])}); chance 0.5"
             + ("; margin = top-1 minus the control's, paired over the same test texts" if has_control else ""), head]
    for n, r in rows.items():
        ctl = (f" {r['control_top1']:9.3f} {r['control_top5']:9.3f} {r['top1_margin']:+7.3f} {r['top1_margin_se']:6.3f}"
               if has_control else "")
        lines.append(f"{n:>5} {r['sae_top1']:7.3f} {r['sae_top1_se']:6.3f} {r['sae_top5']:7.3f}{ctl} {r['dense']:7.3f}")
    return "\n".join(lines)
