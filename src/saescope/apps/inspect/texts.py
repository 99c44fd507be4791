"""Which features fire on given texts, and which fire more on one set of texts than on another.

`inspect_texts` ranks, per text and layer, the features by their max (or summed) activation over the text's
tokens, with the tokens they fired on. `contrast` compares two sets: per feature, the share of tokens it fires
on and its mean activation per token in each set; features are ranked by the difference, which is how a user
finds "the feature of my failure mode" from a handful of bad and good examples.

The first token of every text is left out by default: on models without BOS it is the attention sink (norms
hundreds of times the others), whose codes say nothing about the text; with BOS it is BOS itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from saescope.api.scope import Scope, TextCodes
from saescope.api.store import FeatureStore
from saescope.core.errors import SaescopeError
from saescope.core.layers import LayersOption
from saescope.core.schema import config_field
from saescope.core.system import release_heap

RANKINGS = ("max", "sum")
CONTRAST_RANKINGS = ("rate", "mean")


@dataclass(kw_only=True)
class ReadingConfig(LayersOption):
    """How features are read from texts: which layers, how many top features, ranked how, over which tokens."""

    top: int = config_field(10, "features shown per text and layer (or per side of a contrast)", min=1)
    by: str = config_field("max", "rank a text's features by max or summed activation", choices=RANKINGS)
    skip_first_token: bool = config_field(True, "leave out the first token (the attention sink); the flag counts it too",
                                          flag="--keep-first-token")
    max_length: int = config_field(512, "tokens per text (longer ones are cut, with a warning)", min=1)
    batch_size: int = config_field(8, "texts per batch", min=1)
    rank: str = config_field("rate", "contrast: rank by firing-rate difference or by mean-activation difference",
                             choices=CONTRAST_RANKINGS)


def _first(codes: TextCodes, skip_first: bool) -> int:
    return 1 if skip_first and len(codes.tokens) > 1 else 0


def check_texts(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise SaescopeError(f"no {what} to inspect")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise SaescopeError(f"{what} {i} is empty")
    return list(texts)


def inspect_texts(scope: Scope, texts: Sequence[str], cfg: ReadingConfig, store: FeatureStore | None = None) -> list[dict]:
    """Per text: its tokens and, per layer, the top features with activation, the tokens they fired on and,
    when a feature store is given, their corpus frequency and best contexts."""
    texts = check_texts(texts, "text")
    layers = scope.check_layers(cfg.layer_list())
    out = []
    for text, codes in zip(texts, scope.encode(texts, layers=layers, batch_size=cfg.batch_size, max_length=cfg.max_length)):
        start = _first(codes, cfg.skip_first_token)
        entry = {"text": text, "tokens": codes.tokens, "skipped_tokens": start, "layers": {}}
        for n in layers:
            sae = scope.saes[n]
            dense = codes.layers[n].dense(sae.cfg.d_sae)[start:]  # (tokens, d_sae)
            score = dense.amax(0) if cfg.by == "max" else dense.sum(0)
            vals, feats = score.topk(min(cfg.top, sae.cfg.d_sae))
            rows = []
            for v, f in zip(vals.tolist(), feats.tolist()):
                if v <= 0:
                    break
                col = dense[:, f]
                fired = (col > 0).nonzero()[:, 0]
                row = {"feature": f, "score": v, "max_activation": float(col.max()),
                       "fired_on": [[int(p) + start, codes.tokens[int(p) + start], float(col[p])] for p in fired]}
                if store is not None and n in store.layers:
                    info = store.feature(n, f, contexts=3)
                    row.update(frequency=info["frequency"], contexts=info["contexts"], promoted=info["promoted"][:5])
                rows.append(row)
            entry["layers"][n] = rows
        out.append(entry)
    return out


def _set_stats(scope: Scope, texts: list[str], cfg: ReadingConfig, layers: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer: tokens counted, and per feature the tokens it fired on, its activation sum, the texts it fired in."""
    stats = {n: {"tokens": torch.zeros((), dtype=torch.float64),
                 "fires": torch.zeros(scope.saes[n].cfg.d_sae, dtype=torch.float64),
                 "act": torch.zeros(scope.saes[n].cfg.d_sae, dtype=torch.float64),
                 "texts": torch.zeros(scope.saes[n].cfg.d_sae, dtype=torch.float64)} for n in layers}
    for i in range(0, len(texts), 64):  # chunks keep the per-token codes of a large set from piling up
        for codes in scope.encode(texts[i : i + 64], layers=layers, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                  progress=False):
            start = _first(codes, cfg.skip_first_token)
            for n in layers:
                s = stats[n]
                idx, val = codes.layers[n].indices[start:].flatten(), codes.layers[n].values[start:].flatten().double()
                on = val > 0
                s["tokens"] += len(codes.tokens) - start
                s["fires"].index_add_(0, idx[on], torch.ones_like(val[on]))
                s["act"].index_add_(0, idx[on], val[on])
                s["texts"][idx[on].unique()] += 1
        release_heap()
    return stats


def contrast(scope: Scope, texts: Sequence[str], baseline: Sequence[str], cfg: ReadingConfig,
             store: FeatureStore | None = None) -> dict:
    """Features ranked by how much more they fire on `texts` than on `baseline`, per layer.

    rate = share of the set's tokens on which the feature fires; mean = activation summed over the set's tokens
    / tokens; text_rate = share of the set's texts in which it fires at least once. Ranked by rate difference
    (ties by mean difference), or with cfg.rank="mean" by mean difference; the other end of the ranking
    (features that fire more on the baseline) is listed too."""
    texts, baseline = check_texts(texts, "text"), check_texts(baseline, "baseline text")
    layers = scope.check_layers(cfg.layer_list())
    a, b = _set_stats(scope, texts, cfg, layers), _set_stats(scope, baseline, cfg, layers)
    out: dict = {"n_texts": len(texts), "n_baseline": len(baseline), "layers": {}}
    for n in layers:
        rate_a, rate_b = a[n]["fires"] / a[n]["tokens"], b[n]["fires"] / b[n]["tokens"]
        mean_a, mean_b = a[n]["act"] / a[n]["tokens"], b[n]["act"] / b[n]["tokens"]
        trate_a, trate_b = a[n]["texts"] / len(texts), b[n]["texts"] / len(baseline)
        diff, mean_diff = rate_a - rate_b, mean_a - mean_b
        if cfg.rank == "rate":
            key = diff + 1e-9 * mean_diff / mean_diff.abs().max().clamp(min=1e-12)
        else:
            key = mean_diff + 1e-9 * diff / diff.abs().max().clamp(min=1e-12)

        def rows(order: torch.Tensor) -> list[dict]:
            got = []
            for f in order.tolist():
                row = {"feature": f, "rate": float(rate_a[f]), "rate_baseline": float(rate_b[f]), "rate_diff": float(diff[f]),
                       "mean": float(mean_a[f]), "mean_baseline": float(mean_b[f]), "mean_diff": float(mean_a[f] - mean_b[f]),
                       "text_rate": float(trate_a[f]), "text_rate_baseline": float(trate_b[f])}
                if store is not None and n in store.layers:
                    info = store.feature(n, f, contexts=5)
                    row.update(frequency=info["frequency"], contexts=info["contexts"], promoted=info["promoted"][:5])
                got.append(row)
            return got

        top = min(cfg.top, len(key))
        out["layers"][n] = {"tokens": float(a[n]["tokens"]), "tokens_baseline": float(b[n]["tokens"]),
                            "more_on_texts": rows(key.topk(top).indices), "more_on_baseline": rows((-key).topk(top).indices)}
    return out


def chance_contrast(result: dict) -> dict[int, float]:
    """The best rate difference per layer: for a random control SAE this is how much separation chance gives."""
    return {n: (v["more_on_texts"][0]["rate_diff"] if v["more_on_texts"] else 0.0) for n, v in result["layers"].items()}
