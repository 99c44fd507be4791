"""Per-layer evaluation: FVU, L0, dead and dense fractions, and the LM loss with the SAE spliced in.

CE recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean), where CE_zero replaces the layer's output
by zeros at every token (on a model without biases after the last norm, CE_zero is ln(vocab size)).
KL is KL(clean || spliced) of the next-token distributions, averaged over tokens. FVU is pooled over the
kept tokens: sum |x - x_hat|^2 / sum |x - mean x|^2. Tokens that the outlier filter drops (the same filter
as training, saescope.core.activations.OutlierFilter: norm above outlier_factor x the running median norm, mostly
the attention-sink first token) are passed through unchanged when splicing and left out of FVU and L0;
their share is reported as `passthrough_frac`. Zero-ablation zeroes them too, so CE recovered credits the
SAE with them: compare KL and FVU with a random control's before reading CE recovered.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from saescope.api.controls import ControlsOption, control_kind
from saescope.api.scope import SAEOptions, Scope, place_saes
from saescope.core.activations import OutlierFilter
from saescope.core.data import batches, iter_texts
from saescope.core.errors import SaescopeError
from saescope.core.io import RunDir
from saescope.core.io.lock import holding_lock
from saescope.core.layers import LayersOption
from saescope.core.models import LoadedModel, capture, forward_from, layer_hooks
from saescope.core.models.load import DTYPE_NAMES
from saescope.core.sae import SAE
from saescope.core.schema import Field, config_field

DENSE_THRESHOLD = 0.1  # a latent is "dense" if it fires on more than 10% of tokens


@dataclass
class LayerEval:
    layer: int
    fvu: float
    l0: float
    dead_frac: float
    dense_frac: float
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_recovered: float
    kl: float
    passthrough_frac: float
    ce_mean: float = math.nan  # the layer's output replaced by the batch's mean activation at every token
    ce_recovered_mean: float = math.nan  # (CE_mean - CE_sae) / (CE_mean - CE_clean): zero ablation flatters
    l0_std: float = math.nan  # the spread of L0 over tokens: 0 for top-k, what a threshold kind varies by
    feature_freq: Tensor | None = field(default=None, repr=False, compare=False)  # (d_sae,), not written to JSON
    # per held-out sequence: "sse" and "ce_sae" of this set, "ce_clean", "ce_zero" and "ce_mean" shared by every set on
    # the same tokens, and "variance" (FVU's pooled denominator): what paired_margins needs; not written to JSON
    per_sequence: dict[str, Tensor] | None = field(default=None, repr=False, compare=False)


def _ready(lm: LoadedModel, sets: dict[str, dict[int, SAE]]) -> list[int]:
    """The layers that every SAE set covers alike, each set checked against the model and placed where it runs."""
    layers = sorted(next(iter(sets.values())))
    for name, saes in sets.items():
        place_saes(lm, saes)
        if sorted(saes) != layers:
            raise SaescopeError(f"SAE set {name!r} covers layers {sorted(saes)}, expected {layers}")
    return layers


def _pooled_fvu(sse: float, x_sum: Tensor | float, x2_sum: float, count: int) -> float:
    """FVU pooled over tokens from running sums: sum |x - x_hat|^2 / sum |x - mean x|^2, the denominator being
    sum |x|^2 - |sum x|^2 / n."""
    return sse / max(_pooled_variance(x_sum, x2_sum, count), 1e-12)


def _pooled_variance(x_sum: Tensor | float, x2_sum: float, count: int) -> float:
    """sum |x - mean x|^2 from running sums: sum |x|^2 - |sum x|^2 / n (0 without tokens)."""
    return x2_sum - float((x_sum ** 2).sum()) / count if count else 0.0


_CHUNK = 64  # positions per slice of (positions x vocab) work: a few MB, cache-sized, never a fresh 200 MB tensor


class CleanTarget:
    """The clean pass's next-token distribution, for the CE and KL of every spliced or ablated pass of a batch:
    p = softmax(clean logits) and sum p log p are computed once, so KL(clean || other) = sum p log p - sum p log q
    costs each pass one log-softmax of its own, in slices (`ce_and_kl`)."""

    def __init__(self, logits: Tensor, ids: Tensor):
        self.targets = ids[:, 1:].reshape(-1)
        self.sequences = ids.shape[0]
        self.p = torch.empty(self.targets.numel(), logits.shape[-1], dtype=torch.float32, device=logits.device)
        self.neg_entropy = 0.0
        self.ce = 0.0
        token_ce = torch.empty(self.targets.numel(), dtype=torch.float64, device=logits.device)
        for rows, chunk in self._slices(logits):
            logp = F.log_softmax(chunk.float(), -1)
            picked = logp.gather(1, self.targets[rows, None])
            self.ce -= float(picked.sum())
            token_ce[rows] = -picked[:, 0].double()
            torch.exp(logp, out=self.p[rows])
            self.neg_entropy += float((self.p[rows] * logp).sum())
        self.ce_per_sequence = self._by_sequence(token_ce)

    def _by_sequence(self, token_ce: Tensor) -> Tensor:
        return token_ce.reshape(self.sequences, -1).sum(1).cpu()

    def _slices(self, logits: Tensor):
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        for start in range(0, flat.shape[0], _CHUNK):
            rows = slice(start, start + _CHUNK)
            yield rows, flat[rows]

    def ce_everywhere(self, logits: Tensor, per_sequence: list[Tensor] | None = None) -> float:
        """Summed next-token CE when every position predicts from the same `logits` (vocab,): an ablation by a
        constant (constant_logits); `per_sequence` as in ce_and_kl."""
        token_ce = -F.log_softmax(logits.float(), -1).double()[self.targets]
        if per_sequence is not None:
            per_sequence.append(self._by_sequence(token_ce))
        return float(token_ce.sum())

    def ce_and_kl(self, logits: Tensor, *, with_kl: bool = True, per_sequence: list[Tensor] | None = None
                  ) -> tuple[float, float]:
        """Summed next-token CE of `logits` (same ids) and, with_kl, the summed KL(clean || logits); `per_sequence`,
        when given, receives the CE summed per sequence (the paired margins' unit)."""
        ce, cross = 0.0, 0.0
        token_ce = torch.empty(self.targets.numel(), dtype=torch.float64, device=logits.device)
        for rows, chunk in self._slices(logits):
            logq = F.log_softmax(chunk.float(), -1)
            picked = logq.gather(1, self.targets[rows, None])
            ce -= float(picked.sum())
            token_ce[rows] = -picked[:, 0].double()
            if with_kl:
                cross += float((self.p[rows] * logq).sum())
        if per_sequence is not None:
            per_sequence.append(self._by_sequence(token_ce))
        return ce, (self.neg_entropy - cross) if with_kl else 0.0


CONSTANT_POSITIONS = 16  # positions of the probe that checks an ablation by a constant is the same at each position
# Rounding alone makes positions differ by up to ~2e-5 of the log-probabilities' spread (SmolLM2 in fp32; 0 in bf16);
# attention sinks and recurrent layers by 5e-3 and more, even in tiny random models.
CONSTANT_TOLERANCE = 2e-4


def constant_logits(model: torch.nn.Module, layer: int, vector: Tensor) -> Tensor | None:
    """The logits (vocab,) when decoder block `layer` outputs `vector` at every position, from CONSTANT_POSITIONS
    positions; None where they differ by position by more than CONSTANT_TOLERANCE of the log-probabilities' spread
    over the vocabulary. With equal inputs, attention averages equal values and the MLPs act per position, so every
    position computes the same thing and the zero and mean ablations need not run the whole batch; attention sinks or
    recurrent layers break that, and the check sees it (the caller then runs the full pass)."""
    probe = vector.reshape(1, 1, -1).expand(1, CONSTANT_POSITIONS, -1).contiguous()
    logits = forward_from(model, layer, probe)[0].float()
    logp = F.log_softmax(logits, -1)
    spread = float(logp[0].std())
    return logits[0] if float((logp - logp[:1]).abs().max()) <= CONSTANT_TOLERANCE * spread else None


@torch.no_grad()
def evaluate(lm: LoadedModel, saes: dict[int, SAE], **kw) -> list[LayerEval]:
    """Per-layer figures of `saes` on `n_tokens` held-out tokens of `data` (default: the embedded corpus)."""
    return evaluate_sets(lm, {"sae": saes}, **kw)["sae"]


@torch.no_grad()
def evaluate_sets(
    lm: LoadedModel,
    sets: dict[str, dict[int, SAE]],
    *,
    data: str | None = None,
    text_column: str = "text",
    n_tokens: int = 4096,
    ctx_len: int = 256,
    batch_size: int = 8,
    outlier_factor: float = 5.0,
    split: str = "eval",
) -> dict[str, list[LayerEval]]:
    """Several SAE sets for the same layers (e.g. trained and control) on the same tokens: the clean and
    ablated forward passes are shared, only the spliced one is run per set. One clean pass per batch keeps every
    layer's output; each spliced or ablated pass resumes from its layer (saescope.core.models.forward_from), and the
    zero and mean ablations, the same vector at every position, run on a few positions where the model computes
    the same at each (constant_logits), else on the whole batch."""
    layers = _ready(lm, sets)
    model, device = lm.model, lm.device
    acc = {(s, n): {"sse": 0.0, "x_sum": 0.0, "x2_sum": 0.0, "cnt": 0, "l0": 0.0, "l0_sq": 0.0, "fires": None,
                    "ce_sae": 0.0, "kl": 0.0, "pass": 0, "tok": 0, "seq_sse": [], "seq_ce": []} for s in sets for n in layers}
    seq = {n: {"ce_clean": [], "ce_zero": [], "ce_mean": []} for n in layers}
    ce_zero = dict.fromkeys(layers, 0.0)
    ce_mean = dict.fromkeys(layers, 0.0)
    ce_clean = 0.0
    n_pred = 0
    # Never more sequences than n_tokens asks for: a batch of 8 would make --n-tokens 1024 run (and cost) 2048.
    batch_size = max(1, min(batch_size, math.ceil(n_tokens / ctx_len)))
    n_batches = max(1, math.ceil(n_tokens / (ctx_len * batch_size)))
    stream = batches(iter_texts(data, text_column=text_column, split=split), lm.tokenizer, ctx_len=ctx_len,
                     batch_size=batch_size, seed=1234, shuffle_buffer=1)
    bar = tqdm(total=n_batches * len(layers), desc="eval", unit="layer-batch", dynamic_ncols=True)
    done = 0
    filters = {n: OutlierFilter(outlier_factor) for n in layers}
    zero_logits: dict[int, Tensor | None] = {}
    for ids in stream:
        if done >= n_batches:
            break
        ids = ids.to(device)
        acts: dict[int, Tensor] = {}
        with layer_hooks(model, {n: (lambda n: lambda h: acts.__setitem__(n, h.detach()))(n) for n in layers}):
            clean_logits = model(input_ids=ids, use_cache=False).logits
        clean = CleanTarget(clean_logits, ids)
        del clean_logits
        ce_clean += clean.ce
        n_pred += ids[:, 1:].numel()
        for n in layers:
            h = acts[n]
            x = h.reshape(-1, h.shape[-1]).float()
            keep = filters[n].keep(x)
            xk = x[keep]
            seq[n]["ce_clean"].append(clean.ce_per_sequence)
            for s, saes in sets.items():
                sae, a = saes[n], acc[s, n]
                code = sae.encode(x)
                x_hat = sae.decode(code)
                a["sse"] += float((xk - x_hat[keep]).pow(2).sum())
                a["seq_sse"].append(((x - x_hat).pow(2).sum(1) * keep).double().reshape(h.shape[0], -1).sum(1).cpu())
                a["x_sum"] = a["x_sum"] + xk.sum(0)
                a["x2_sum"] += float(xk.pow(2).sum())
                a["cnt"] += int(keep.sum())
                active = code.values[keep] > 0
                a["l0"] += float(active.sum())
                a["l0_sq"] += float(active.sum(1).float().pow(2).sum())
                fires = torch.zeros(sae.cfg.d_sae, device=x.device)
                fires.index_add_(0, code.indices[keep].reshape(-1), active.reshape(-1).float())
                a["fires"] = fires if a["fires"] is None else a["fires"] + fires
                a["pass"] += int((~keep).sum())
                a["tok"] += keep.numel()
                spliced = torch.where(keep[:, None], x_hat, x).reshape(h.shape).to(h.dtype)
                ce, kl = clean.ce_and_kl(forward_from(model, n, spliced), per_sequence=a["seq_ce"])
                a["ce_sae"] += ce
                a["kl"] += kl
            if n not in zero_logits:  # the same for every batch
                zero_logits[n] = constant_logits(model, n, torch.zeros_like(h[0, 0]))
            mean_vector = (xk if len(xk) else x).mean(0).to(h.dtype)
            for totals, key, vector, logits in ((ce_zero, "ce_zero", torch.zeros_like(mean_vector), zero_logits[n]),
                                                (ce_mean, "ce_mean", mean_vector, constant_logits(model, n, mean_vector))):
                totals[n] += (clean.ce_everywhere(logits, per_sequence=seq[n][key]) if logits is not None else
                              clean.ce_and_kl(forward_from(model, n, vector.expand(h.shape).contiguous()), with_kl=False,
                                              per_sequence=seq[n][key])[0])
            bar.update(1)
        done += 1
    bar.close()
    if done == 0:
        raise SaescopeError("no evaluation data: the eval split is smaller than one batch")
    clean = ce_clean / n_pred
    out: dict[str, list[LayerEval]] = {}
    for s in sets:
        results = []
        for n in layers:
            a = acc[s, n]
            ce_sae, zero, mean = a["ce_sae"] / n_pred, ce_zero[n] / n_pred, ce_mean[n] / n_pred
            freq = a["fires"] / max(a["cnt"], 1)
            variance = _pooled_variance(a["x_sum"], a["x2_sum"], a["cnt"]) if a["cnt"] else float("nan")
            per_sequence = {"sse": torch.cat(a["seq_sse"]), "ce_sae": torch.cat(a["seq_ce"]),
                            **{key: torch.cat(v) for key, v in seq[n].items()}, "variance": torch.tensor(variance)}
            results.append(LayerEval(
                layer=n, fvu=_pooled_fvu(a["sse"], a["x_sum"], a["x2_sum"], a["cnt"]), l0=a["l0"] / max(a["cnt"], 1),
                dead_frac=float((freq == 0).float().mean()), dense_frac=float((freq > DENSE_THRESHOLD).float().mean()),
                ce_clean=clean, ce_sae=ce_sae, ce_zero=zero,
                ce_recovered=(zero - ce_sae) / (zero - clean) if zero != clean else float("nan"),
                kl=a["kl"] / n_pred, passthrough_frac=a["pass"] / max(a["tok"], 1), ce_mean=mean,
                ce_recovered_mean=(mean - ce_sae) / (mean - clean) if mean != clean else float("nan"), feature_freq=freq.cpu(),
                l0_std=_spread(a["l0"], a["l0_sq"], a["cnt"]), per_sequence=per_sequence))
        out[s] = results
    return out


@torch.no_grad()
def fvu_on_texts(lm: LoadedModel, sets: dict[str, dict[int, SAE]], texts: Iterable[str], *, n_tokens: int = 4096,
                 ctx_len: int = 128, batch_size: int = 32, outlier_factor: float = 5.0,
                 l0: dict[str, dict[int, tuple[float, float]]] | None = None) -> dict[str, dict[int, float]]:
    """FVU of each SAE set per layer on about n_tokens tokens of `texts` (packed into ctx_len chunks, the outlier
    filter as in training): reconstruction on text of another domain than the training corpus costs one LM pass
    for every layer, no spliced passes. `l0`, when given, receives each set's L0 per layer on the same tokens:
    (mean, spread over tokens)."""
    layers = _ready(lm, sets)
    filters = {n: OutlierFilter(outlier_factor) for n in layers}
    sse = dict.fromkeys([(s, n) for s in sets for n in layers], 0.0)  # squared error, pooled over kept tokens
    l0_sums = {(s, n): torch.zeros(2, dtype=torch.float64) for s in sets for n in layers}
    x_sum: dict[int, Tensor | float] = dict.fromkeys(layers, 0.0)
    x2_sum = dict.fromkeys(layers, 0.0)
    count = dict.fromkeys(layers, 0)
    done = 0
    for ids in batches(texts, lm.tokenizer, ctx_len=ctx_len, batch_size=batch_size, seed=1234, shuffle_buffer=1):
        acts = capture(lm.model, ids.to(lm.device), layers)
        for n in layers:
            x = acts[n].reshape(-1, acts[n].shape[-1]).float()
            xk = x[filters[n].keep(x)]
            x_sum[n] = x_sum[n] + xk.sum(0)
            x2_sum[n] += float(xk.pow(2).sum())
            count[n] += len(xk)
            for s, saes in sets.items():
                code = saes[n].encode(xk)
                sse[s, n] += float((xk - saes[n].decode(code).to(xk.dtype)).pow(2).sum())
                per_token = (code.values > 0).sum(1).double()
                l0_sums[s, n] += torch.stack([per_token.sum(), per_token.pow(2).sum()])
        done += ids.numel()
        if done >= n_tokens:
            break
    if done == 0:
        raise SaescopeError("no tokens to measure FVU on: the texts are shorter than one chunk")
    if l0 is not None:
        for s in sets:
            l0[s] = {n: (float(l0_sums[s, n][0]) / max(count[n], 1), _spread(*l0_sums[s, n].tolist(), count[n])) for n in layers}
    return {s: {n: _pooled_fvu(sse[s, n], x_sum[n], x2_sum[n], count[n]) for n in layers} for s in sets}


def _spread(total: float, total_sq: float, count: int) -> float:
    if count == 0:
        return float("nan")
    mean = total / count
    return math.sqrt(max(total_sq / count - mean * mean, 0.0))


def _varies(results: list[LayerEval]) -> bool:
    """Whether L0 varies per token enough to show its spread (a threshold kind; top-k keeps k but for a rare token
    with fewer positive pre-activations)."""
    return any(r.l0_std > 0.5 for r in results)


def format_table(results: list[LayerEval]) -> str:
    sd = _varies(results)
    head = (f"{'layer':>5} {'FVU':>7} {'L0':>6} " + (f"{'L0 sd':>6} " if sd else "") + f"{'dead':>6} {'dense':>6} "
            f"{'CE clean':>8} {'CE sae':>7} {'CE zero':>7} {'CE mean':>7} {'CE rec':>7} {'rec/mean':>8} {'KL':>7} {'pass':>6}")
    rows = [head]
    for r in results:
        rows.append(f"{r.layer:>5} {r.fvu:7.4f} {r.l0:6.1f} " + (f"{r.l0_std:6.1f} " if sd else "")
                    + f"{r.dead_frac:6.3f} {r.dense_frac:6.3f} {r.ce_clean:8.3f} "
                    f"{r.ce_sae:7.3f} {r.ce_zero:7.3f} {r.ce_mean:7.3f} {r.ce_recovered:7.3f} {r.ce_recovered_mean:8.3f} "
                    f"{r.kl:7.4f} {r.passthrough_frac:6.3f}")
    return "\n".join(rows)


def format_comparison(results: list[LayerEval], control: list[LayerEval]) -> str:
    """The trained SAEs beside their random-direction control, layer by layer."""
    sd = _varies(results)
    head = (f"{'layer':>5} {'FVU':>7} {'ctrl':>7} {'L0':>6} " + (f"{'L0 sd':>6} " if sd else "") + f"{'ctrl':>6} "
            f"{'dead':>6} {'ctrl':>6} {'CE rec':>7} {'ctrl':>7} {'rec/mean':>8} {'ctrl':>7} {'KL':>7} {'ctrl':>7}")
    rows = [head]
    for r, c in zip(results, control):
        rows.append(f"{r.layer:>5} {r.fvu:7.4f} {c.fvu:7.4f} {r.l0:6.1f} " + (f"{r.l0_std:6.1f} " if sd else "")
                    + f"{c.l0:6.1f} {r.dead_frac:6.3f} {c.dead_frac:6.3f} "
                    f"{r.ce_recovered:7.3f} {c.ce_recovered:7.3f} {r.ce_recovered_mean:8.3f} {c.ce_recovered_mean:7.3f} "
                    f"{r.kl:7.4f} {c.kl:7.4f}")
    return "\n".join(rows)


def as_records(results: list[LayerEval]) -> list[dict]:
    return [{f.name: getattr(r, f.name) for f in fields(r) if f.name not in NOT_WRITTEN} for r in results]


NOT_WRITTEN = ("feature_freq", "per_sequence")


def _paired(diff: Tensor, scale: float) -> tuple[float, float]:
    """(sum of per-sequence differences / scale, its standard error): the sequences are the independent draws."""
    n = diff.numel()
    se = math.sqrt(n) * float(diff.std()) / abs(scale) if n > 1 else float("nan")
    return float(diff.sum()) / scale, se


def paired_margins(sae: LayerEval, control: LayerEval) -> dict:
    """The trained SAEs' margin over a control measured on the same sequences, positive where the SAE does better, with
    paired standard errors (the per-sequence differences' spread): FVU (control's minus the SAE's), CE recovered
    against zero and against mean ablation (the SAE's minus the control's). Both are sums over sequences divided by a
    denominator both sides share, so the margin is the sum of the per-sequence differences over it."""
    a, b = sae.per_sequence, control.per_sequence
    if a is None or b is None:
        raise SaescopeError("paired margins need both evaluations' per-sequence figures (made by evaluate_sets)")
    fvu, fvu_se = _paired(b["sse"] - a["sse"], float(a["variance"]))
    diff = b["ce_sae"] - a["ce_sae"]
    rec, rec_se = _paired(diff, float((a["ce_zero"] - a["ce_clean"]).sum()))
    mean, mean_se = _paired(diff, float((a["ce_mean"] - a["ce_clean"]).sum()))
    return {"layer": sae.layer, "fvu": fvu, "fvu_se": fvu_se, "ce_recovered": rec, "ce_recovered_se": rec_se,
            "ce_recovered_mean": mean, "ce_recovered_mean_se": mean_se, "sequences": int(a["sse"].numel())}


SETTINGS = ("model", "data", "text_column", "n_tokens", "ctx_len", "outlier_factor", "model_dtype")


def _eval_record() -> dict:
    """A layer's figures as eval.json holds them, read back strictly (a merge keeps them): every figure of LayerEval,
    NaN allowed; the mean-ablation pair is absent from files written before it was measured."""
    spec = {f.name: Field(float) for f in fields(LayerEval) if f.name not in ("layer", *NOT_WRITTEN)}
    spec.update(layer=Field(int, min=0), ce_mean=Field(float, required=False), ce_recovered_mean=Field(float, required=False),
                l0_std=Field(float, required=False))
    return spec


EVAL_RECORD = _eval_record()
MARGINS_RECORD = {"control": Field(str), "kind": Field(str), "layers": Field(list), "figures": Field(list)}
MARGIN_RECORD = {"layer": Field(int, min=0), "sequences": Field(int, min=0),
                 **{name: Field(float) for name in ("fvu", "fvu_se", "ce_recovered", "ce_recovered_se", "ce_recovered_mean",
                                                    "ce_recovered_mean_se")}}


def margin_words(margin: float, se: float) -> str:
    """A margin in words: earned (more than two standard errors above nil), nil (within two) or below."""
    if not math.isfinite(margin) or not math.isfinite(se):
        return "unmeasured"
    if margin > 2 * se:
        return "earned"
    return "below" if margin < -2 * se else "nil"


def format_margins(margins: list[dict]) -> str:
    """Each control's margin table, layer by layer, margin +- paired SE, and what it says in words."""
    lines = []
    for entry in margins:
        lines.append(f"margin over {entry['kind']} control {entry['control']} (positive: the SAEs do better; +- paired SE "
                     "over held-out sequences)")
        lines.append(f"{'layer':>5} {'FVU':>17} {'CE rec':>17} {'rec/mean':>17}  words")
        for m in entry["layers"]:
            cells = [(m[key], m[f"{key}_se"]) for key in ("fvu", "ce_recovered", "ce_recovered_mean")]
            words = ", ".join(f"{name} {margin_words(*c)}" for name, c in zip(("FVU", "CE rec", "rec/mean"), cells))
            lines.append(f"{m['layer']:>5} " + " ".join(f"{v:+8.4f} +-{e:6.4f}" for v, e in cells) + f"  {words}")
    return "\n".join(lines)


def read_results(path: Path) -> dict | None:
    """An evaluation file as written by write_results, checked record by record (None if there is none). Called
    before an evaluation too, so that a file it could not merge into is refused before minutes of work."""
    from saescope.core.files import read_json
    from saescope.core.schema import check_record

    if not path.exists():
        return None
    body = read_json(path, {"layers": Field(list), "control": Field(list, required=False, nullable=True),
                            "margins": Field(list, required=False)})
    for part in ("layers", "control"):
        for i, rec in enumerate(body.get(part) or []):
            check_record(rec, EVAL_RECORD, f"{path}: {part}[{i}]")
    for i, entry in enumerate(body.get("margins") or []):
        check_record(entry, MARGINS_RECORD, f"{path}: margins[{i}]")
        for j, rec in enumerate(entry["layers"]):
            check_record(rec, MARGIN_RECORD, f"{path}: margins[{i}].layers[{j}]")
    return body


def write_results(results: list[LayerEval], path: Path, extra: dict | None = None, *,
                  control: list[LayerEval] | None = None, margins: list[dict] | None = None) -> Path:
    """Write an evaluation without losing one already there: figures made with the same settings merge into it per
    layer (a partial eval updates its layers, a control missing from this one is kept); figures made with other
    settings go to the next free eval-N.json beside it. Returns the file written."""
    from saescope.core.files import atomic_write_json

    body = {"layers": as_records(results), **(extra or {})}
    if control is not None:
        body["control"] = as_records(control)
    if margins:
        body["margins"] = margins
    old = read_results(path)
    if old is not None:
        # a file written before the LM's dtype was recorded could be fp32 or bf16 (train --eval-tokens used the
        # trainer's LM): unknown, so nothing merges into it
        if all(old.get(key) == body.get(key) for key in SETTINGS):
            for part in ("layers", "control"):
                if part in old or part in body:
                    merged = {r["layer"]: r for r in old.get(part) or [] if isinstance(r, dict) and "layer" in r}
                    merged.update({r["layer"]: r for r in body.get(part) or []})
                    body[part] = [merged[n] for n in sorted(merged)]
            if "margins" in old and "margins" not in body:  # margins are whole: a later eval without controls keeps them
                body["margins"] = old["margins"]
        else:
            i = 2
            while (path.with_name(f"{path.stem}-{i}{path.suffix}")).exists():
                i += 1
            differ = ", ".join(f"{key} {old.get(key)!r} -> {body.get(key)!r}" for key in SETTINGS if old.get(key) != body.get(key))
            path = path.with_name(f"{path.stem}-{i}{path.suffix}")
            warnings.warn(f"{path.with_name('eval.json').name} holds figures made with other settings ({differ}); "
                          f"these go to {path.name}", stacklevel=2)
    atomic_write_json(path, body)
    return path


@dataclass(kw_only=True)
class EvalConfig(SAEOptions, LayersOption, ControlsOption):
    """`saescope eval`: FVU, L0, dead/dense fractions, CE recovered and KL per layer, beside each control given (the first
    in the table, every one's margin with its paired standard error)."""

    data: str | None = config_field(None, "text file, folder or hub dataset id (default: the embedded corpus's held-out split)")
    text_column: str = config_field("text", "for tables and JSON: the text column")
    n_tokens: int = config_field(4096, "held-out tokens", min=1)
    ctx_len: int = config_field(256, "tokens per sequence", min=2)
    outlier_factor: float = config_field(5.0, "the outlier filter of training: tokens with norm > factor x the running "
                                         "median pass through unchanged; 0 = off", min=0)
    out: str | None = config_field(None, "folder for eval.json (default: the SAE folder)", output="folder")

    def writes_into(self) -> Path:
        return (RunDir(self.out) if self.out else RunDir.of_sae(self.sae)).path


@dataclass
class EvalResult:
    path: Path
    layers: list[LayerEval]
    control: list[LayerEval] | None
    margins: list[dict] = field(default_factory=list)

    def text(self) -> str:
        table = format_table(self.layers) if self.control is None else format_comparison(self.layers, self.control)
        margins = f"\n{format_margins(self.margins)}" if self.margins else ""
        return f"{table}{margins}\neval results: {self.path}"


@holding_lock
def run_eval(cfg: EvalConfig, *, scope: Scope | None = None) -> EvalResult:
    """Evaluate the SAEs (and the control) and merge the figures into OUT/eval.json (write_results). `scope`: the model
    and SAEs already loaded (a training run's), instead of loading cfg.sae."""
    path = RunDir(cfg.writes_into()).eval
    read_results(path)  # a file the results could not merge into is refused before the work
    scope = scope or cfg.load_scope(cfg.layer_list())
    controls = cfg.load_controls(scope.saes)
    names = {spec: "control" if i == 0 else f"control {i + 1}" for i, spec in enumerate(controls)}
    sets = {"sae": scope.saes, **{names[spec]: saes for spec, saes in controls.items()}}
    settings = {"data": cfg.data, "text_column": cfg.text_column, "n_tokens": cfg.n_tokens, "ctx_len": cfg.ctx_len,
                "outlier_factor": cfg.outlier_factor}
    results = evaluate_sets(scope.lm, sets, **settings)
    recorded = {"model": scope.lm.name, **{k: v for k, v in settings.items() if k != "data"}, "data": cfg.data or "default",
                "model_dtype": DTYPE_NAMES.get(scope.lm.dtype, str(scope.lm.dtype))}
    margins = [{"control": spec, "kind": control_kind(saes), "figures": as_records(results[names[spec]]),
                "layers": [paired_margins(r, c) for r, c in zip(results["sae"], results[names[spec]])]}
               for spec, saes in controls.items()]
    written = write_results(results["sae"], path, recorded, control=results.get("control"), margins=margins)
    return EvalResult(written, results["sae"], results.get("control"), margins)
