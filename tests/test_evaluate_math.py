"""evaluate_sets' figures against the same figures computed by hand with plain torch on the tiny Qwen3.

The hand computation shares nothing with saescope but the token batches, which it reads off the model's
own input (a forward pre-hook), so it does not depend on how the evaluation draws its data: its own
decoder-layer hooks, its own top-k SAE maths, and cross-entropy / KL straight from torch.nn.functional,
summed in float64. Definitions (module docstring of saescope.api.evaluate and docs/qwen-scope-method.md):

    FVU          = sum |x - x_hat|^2 / sum |x - mean(x)|^2   over the kept tokens of all batches
    CE recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean), CE_zero with the layer's output set to 0
    KL           = KL(clean || spliced) of the next-token distributions, averaged over predicted tokens
    kept token   = norm <= outlier_factor x the running median of the batch-median norms (OutlierFilter);
                   the others are passed through unchanged and left out of FVU, L0 and frequencies
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import saescope.api.evaluate as evaluate_module
from conftest import random_saes, tiny_model
from saescope.api.evaluate import DENSE_THRESHOLD, constant_logits, evaluate_sets
from saescope.core.models import forward_from, load_model
from saescope.core.sae import SAEConfig, TopKSAE

LAYERS = [0, 2]
D = 64  # the tiny Qwen3's d_model
RUN = {"n_tokens": 256, "ctx_len": 32, "batch_size": 4}  # two batches of 4 x 32 tokens


@pytest.fixture(scope="module")
def lm(tiny_qwen3):
    """The tiny Qwen3 with its final norm scaled up 10x: a random model's logits are nearly uniform (every CE near
    ln 512, CE_zero within 0.01 of CE_clean, CE recovered a ratio of rounding errors); sharper logits make the
    figures far apart and well conditioned. The same model serves both sides of every comparison."""
    lm = load_model(str(tiny_qwen3))
    with torch.no_grad():
        lm.model.model.norm.weight.mul_(10.0)
    return lm


@pytest.fixture(scope="module")
def data(text_file) -> str:
    return str(text_file)


def _evaluate_recording(lm, sets, **kw):
    """evaluate_sets, plus the distinct token batches the model was run on, in order (the passes resumed from a
    layer are given hidden states, not tokens)."""
    seen: list[torch.Tensor] = []

    def pre(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        if not any(torch.equal(ids, s) for s in seen):
            seen.append(ids.detach().clone())

    handle = lm.model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        out = evaluate_sets(lm, sets, **kw)
    finally:
        handle.remove()
    return out, seen


def _forward(model, ids, layer, replace=None):
    """Logits (float32) and the output of decoder layer `layer`; `replace(h)` substitutes that output."""
    got = {}

    def hook(_module, _args, out):
        h = out[0] if isinstance(out, tuple) else out
        got["h"] = h.detach()
        if replace is None:
            return None
        new = replace(h)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits.float()
    finally:
        handle.remove()
    return logits, got["h"]


def _sae_by_hand(sae: TopKSAE, x):
    """z = TopK_k(ReLU(x W_enc^T + b_enc)), x_hat = z W_dec + b_dec, as dense matrices."""
    pre = torch.relu(x @ sae.W_enc.detach().T + sae.b_enc.detach())
    vals, idx = pre.topk(sae.cfg.k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, vals)
    return z @ sae.W_dec.detach() + sae.b_dec.detach(), z


def _lower_median(v):
    return v.sort().values[(len(v) - 1) // 2]


class _Typical:
    """The outlier rule of saescope.core.activations.OutlierFilter, written out: keep a token whose norm is at most
    factor x the median of the batch-median norms seen so far (of the last 256 batches; torch's median, the lower
    middle value); factor 0 keeps every token."""

    def __init__(self, factor: float):
        self.factor, self.medians = factor, []

    def __call__(self, x):
        norms = x.norm(dim=1)
        if self.factor <= 0:
            return torch.ones_like(norms, dtype=torch.bool)
        self.medians = (self.medians + [float(_lower_median(norms))])[-256:]
        return norms <= self.factor * _lower_median(torch.tensor(self.medians))


def _ce_sum(logits, ids) -> float:
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1),
                                 reduction="sum"))


def _by_hand(model, batches, layer: int, saes: dict[str, TopKSAE], factor: float) -> dict[str, dict]:
    ce_clean = ce_zero = ce_mean = 0.0
    n_pred = 0
    typical = _Typical(factor)
    acc = {s: {"ce": 0.0, "kl": 0.0, "x": [], "x_hat": [], "z": [], "pass": 0, "tok": 0} for s in saes}
    for ids in batches:
        clean, h = _forward(model, ids, layer)
        zero, _ = _forward(model, ids, layer, torch.zeros_like)
        ce_clean += _ce_sum(clean, ids)
        ce_zero += _ce_sum(zero, ids)
        n_pred += ids[:, 1:].numel()
        p_clean = F.log_softmax(clean[:, :-1].double(), -1)
        x = h.reshape(-1, D).float()
        keep = typical(x)
        mean = x[keep].mean(0) if keep.any() else x.mean(0)  # the batch's mean kept activation, at every token
        ablated, _ = _forward(model, ids, layer, lambda _h, m=mean: m.expand(_h.shape).to(_h.dtype).clone())
        ce_mean += _ce_sum(ablated, ids)
        for s, sae in saes.items():
            a = acc[s]
            x_hat, z = _sae_by_hand(sae, x)
            spliced = torch.where(keep[:, None], x_hat, x).reshape(h.shape).to(h.dtype)
            logits, _ = _forward(model, ids, layer, lambda _h, rep=spliced: rep)
            a["ce"] += _ce_sum(logits, ids)
            p_sae = F.log_softmax(logits[:, :-1].double(), -1)
            a["kl"] += float((p_clean.exp() * (p_clean - p_sae)).sum())
            a["x"].append(x[keep].double())
            a["x_hat"].append(x_hat[keep].double())
            a["z"].append(z[keep])
            a["pass"] += int((~keep).sum())
            a["tok"] += keep.numel()
    out = {}
    for s, a in acc.items():
        x, x_hat, z = torch.cat(a["x"]), torch.cat(a["x_hat"]), torch.cat(a["z"])
        freq = (z > 0).double().mean(0)
        clean, sae_ce, zero, mean = ce_clean / n_pred, a["ce"] / n_pred, ce_zero / n_pred, ce_mean / n_pred
        out[s] = {
            "fvu": float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()),
            "l0": float((z > 0).sum(1).double().mean()),
            "dead_frac": float((freq == 0).double().mean()),
            "dense_frac": float((freq > DENSE_THRESHOLD).double().mean()),
            "ce_clean": clean, "ce_sae": sae_ce, "ce_zero": zero,
            "ce_recovered": (zero - sae_ce) / (zero - clean),
            "ce_mean": mean, "ce_recovered_mean": (mean - sae_ce) / (mean - clean),
            "kl": a["kl"] / n_pred,
            "passthrough_frac": a["pass"] / a["tok"],
            "feature_freq": freq,
        }
    return out


def _exact_sae() -> TopKSAE:
    """Latents +e_i and -e_i with k = d_model: the positive and negative parts of x, decoded back to x exactly."""
    sae = TopKSAE(SAEConfig(D, 2 * D, D))
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _constant_sae(bias: torch.Tensor, seed: int = 0) -> TopKSAE:
    """Random encoder, zero decoder: reconstructs every token as `bias`."""
    sae = TopKSAE(SAEConfig(D, 128, 8))
    sae.init_tied(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.copy_(bias)
    return sae


FIELDS = ("fvu", "l0", "dead_frac", "dense_frac", "ce_clean", "ce_sae", "ce_zero", "ce_mean", "ce_recovered", "kl",
          "passthrough_frac")


@pytest.mark.parametrize("factor", [0.0, 1.0])  # 0: every token kept; 1: about half the tokens passed through
def test_every_figure_matches_the_hand_computation(lm, data, factor):
    sets = {"k4": random_saes(D, LAYERS, k=4, seed=3), "k16": random_saes(D, LAYERS, d_sae=256, k=16, seed=7)}
    # a b_dec away from 0 so that the spliced model is neither the clean one nor the zero-ablated one
    for saes in sets.values():
        for sae in saes.values():
            with torch.no_grad():
                sae.b_dec.copy_(torch.linspace(-0.02, 0.02, D))  # activations have norms of about 0.2
    results, batches = _evaluate_recording(lm, sets, data=data, outlier_factor=factor, **RUN)
    assert len(batches) == 2 and all(b.shape == (4, 32) for b in batches)
    for i, n in enumerate(LAYERS):
        hand = _by_hand(lm.model, batches, n, {s: saes[n] for s, saes in sets.items()}, factor)
        for s in sets:
            got, want = results[s][i], hand[s]
            assert got.layer == n
            for f in FIELDS:
                if f != "ce_recovered":
                    assert getattr(got, f) == pytest.approx(want[f], rel=1e-4, abs=1e-7), (s, n, f)
            # a ratio of differences: its tolerance is the CE tolerance carried through the formula
            for base in ("zero", "mean"):
                tol = 1e-4 * (want[f"ce_{base}"] + want["ce_sae"]) / abs(want[f"ce_{base}"] - want["ce_clean"])
                rec = "ce_recovered" if base == "zero" else "ce_recovered_mean"
                assert getattr(got, rec) == pytest.approx(want[rec], abs=min(tol, 1e-2)), (s, n, base)
            assert torch.allclose(got.feature_freq.double(), want["feature_freq"], atol=1e-7)
        if factor == 0.0:
            assert hand["k4"]["passthrough_frac"] == 0.0
        else:  # the filter really splits the tokens, so the passthrough path is exercised
            assert 0.3 < hand["k4"]["passthrough_frac"] < 0.7
    # the clean loss is one figure of the tokens, whatever the layer or the set
    assert len({r.ce_clean for rs in results.values() for r in rs}) == 1


def test_known_values_exact_zero_and_mean_reconstructions(lm, data):
    exact = {n: _exact_sae() for n in LAYERS}
    zero = {n: _constant_sae(torch.zeros(D), seed=n) for n in LAYERS}
    results, batches = _evaluate_recording(lm, {"exact": exact, "zero": zero}, data=data, outlier_factor=0.0, **RUN)
    for r in results["exact"]:
        # x_hat == x, so the spliced model is the clean one
        assert r.fvu == pytest.approx(0.0, abs=1e-9)
        assert r.ce_sae == pytest.approx(r.ce_clean, rel=1e-7)
        assert r.ce_recovered == pytest.approx(1.0, abs=1e-6)
        assert r.ce_recovered_mean == pytest.approx(1.0, abs=1e-6)
        assert r.kl == pytest.approx(0.0, abs=1e-9)
        assert r.l0 == D  # one of +e_i, -e_i fires for every non-zero coordinate
        assert r.passthrough_frac == 0.0
        # Qwen3 has no biases and RMSNorm(0) = 0: a zeroed residual stream stays zero to the logits, which are then
        # all 0, so CE_zero is exactly the uniform distribution's ln(vocab). The random model does worse than uniform.
        assert r.ce_zero == pytest.approx(math.log(512), rel=1e-6)
        assert abs(r.ce_zero - r.ce_clean) > 0.5  # so CE recovered is well defined
    for r in results["zero"]:
        # x_hat == 0 everywhere: the spliced model is the zero-ablated one
        assert r.ce_sae == pytest.approx(r.ce_zero, rel=1e-7)
        assert r.ce_recovered == pytest.approx(0.0, abs=1e-6)
        assert r.fvu > 1.0
        assert r.kl > 0.01

    # reconstructing every token as the mean activation of the evaluated tokens explains no variance: FVU 1
    means = {}
    for n in LAYERS:
        xs = torch.cat([_forward(lm.model, ids, n)[1].reshape(-1, D).double() for ids in batches])
        means[n] = _constant_sae(xs.mean(0).float(), seed=n)
    (mean_results, again) = _evaluate_recording(lm, {"mean": means}, data=data, outlier_factor=0.0, **RUN)
    assert all(torch.equal(a, b) for a, b in zip(again, batches, strict=True))  # the same tokens as above
    for r, z in zip(mean_results["mean"], results["zero"], strict=True):
        assert r.fvu == pytest.approx(1.0, rel=1e-5)
        assert r.ce_clean == z.ce_clean and r.ce_zero == z.ce_zero



@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen3_moe", "gemma3", "gpt2", "gpt_oss", "qwen3_next"])
def test_an_ablation_by_a_constant_runs_on_few_positions_only_where_every_position_computes_the_same(arch):
    """constant_logits: where attention averages equal values and the MLPs act per token, the logits of an input equal
    at every position are the full pass's at every position; with attention sinks (gpt-oss) or recurrent layers
    (Qwen3-Next's layers 0-2) after the layer the full pass differs by position and the check says so (None), so the
    evaluation runs the full pass there; after the last such block the check lets the few positions run again."""
    model = tiny_model(arch).eval()
    d = model.config.hidden_size if arch != "gpt2" else 32
    gen = torch.Generator().manual_seed(5)
    for n in range(4):
        vector = torch.randn(d, generator=gen)
        got = constant_logits(model, n, vector)
        full = forward_from(model, n, vector.expand(2, 24, d).contiguous())
        # what the blocks after layer n are: sinks in every gpt-oss block, recurrence in Qwen3-Next's layers 0-2
        position_free = {"gpt_oss": n == 3, "qwen3_next": n >= 2}.get(arch, True)
        if position_free:
            assert got is not None and torch.allclose(full, got.expand_as(full), atol=1e-5), (arch, n)
        else:
            assert got is None and float((full - full[:, :1]).abs().max()) > 1e-4, (arch, n)


def test_the_full_ablation_passes_give_the_one_position_figures(lm, data, monkeypatch):
    """Where the check refuses the one-position pass, evaluate_sets runs the zero and mean ablations in full: the same
    figures (to rounding) as the one-position pass gives on a model that allows it."""
    sets = {"sae": random_saes(D, LAYERS, k=4, seed=3)}
    fast = evaluate_sets(lm, sets, data=data, outlier_factor=1.0, **RUN)["sae"]
    monkeypatch.setattr(evaluate_module, "constant_logits", lambda *_: None)
    full = evaluate_sets(lm, sets, data=data, outlier_factor=1.0, **RUN)["sae"]
    for a, b in zip(fast, full, strict=True):
        for f in ("ce_zero", "ce_mean", "ce_recovered", "ce_recovered_mean"):
            assert getattr(a, f) == pytest.approx(getattr(b, f), rel=1e-5), f
        assert (a.ce_clean, a.ce_sae, a.fvu) == (b.ce_clean, b.ce_sae, b.fvu)
        assert torch.allclose(a.per_sequence["ce_mean"], b.per_sequence["ce_mean"], rtol=1e-5)


def test_n_tokens_below_one_batch_runs_only_the_sequences_it_asks_for(lm, data):
    saes = {n: TopKSAE(SAEConfig(d_model=D, d_sae=4 * D, k=8)) for n in LAYERS}
    _, seen = _evaluate_recording(lm, {"sae": saes}, data=data, n_tokens=64, ctx_len=32, batch_size=4)
    assert [tuple(ids.shape) for ids in seen] == [(2, 32)]  # 64 tokens: two sequences of 32, not a batch of 4


def test_paired_margins_are_the_figures_differences_with_the_per_sequence_standard_error(lm, data):
    """The per-sequence sums add up to the pooled figures, a margin is the two sets' figures' difference, its SE the
    per-sequence differences' spread (computed here by hand), and a set against itself has margin 0 and SE 0."""
    from saescope.api.evaluate import margin_words, paired_margins

    sets = {"k4": random_saes(D, LAYERS, k=4, seed=3), "k16": random_saes(D, LAYERS, d_sae=256, k=16, seed=7)}
    results = evaluate_sets(lm, sets, data=data, outlier_factor=1.0, **RUN)
    for small, big in zip(results["k4"], results["k16"]):
        seq = big.per_sequence
        assert seq["sse"].numel() == 8  # two batches of 4 sequences
        assert float(seq["sse"].sum() / seq["variance"]) == pytest.approx(big.fvu, rel=1e-6)
        n_pred = 8 * 31
        assert float(seq["ce_sae"].sum()) / n_pred == pytest.approx(big.ce_sae, rel=1e-6)
        assert float(seq["ce_clean"].sum()) / n_pred == pytest.approx(big.ce_clean, rel=1e-6)
        m = paired_margins(big, small)
        assert m["fvu"] == pytest.approx(small.fvu - big.fvu, rel=1e-5, abs=1e-9)
        assert m["ce_recovered"] == pytest.approx(big.ce_recovered - small.ce_recovered, rel=1e-4, abs=1e-7)
        assert m["ce_recovered_mean"] == pytest.approx(big.ce_recovered_mean - small.ce_recovered_mean, rel=1e-4, abs=1e-7)
        diff = (small.per_sequence["sse"] - seq["sse"]).tolist()
        mean = sum(diff) / len(diff)
        sd = math.sqrt(sum((v - mean) ** 2 for v in diff) / (len(diff) - 1))
        assert m["fvu_se"] == pytest.approx(math.sqrt(len(diff)) * sd / float(seq["variance"]), rel=1e-6)
        assert m["sequences"] == 8
        same = paired_margins(big, big)
        assert all(same[key] == 0.0 for key in ("fvu", "fvu_se", "ce_recovered", "ce_recovered_se"))
    assert margin_words(0.05, 0.01) == "earned" and margin_words(0.01, 0.01) == "nil"
    assert margin_words(-0.05, 0.01) == "below" and margin_words(float("nan"), 0.01) == "unmeasured"
