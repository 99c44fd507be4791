"""Apply a mined rule to any number of texts, streamed, with an audit record per decision.

Only the rule's layers are captured (the forward stops after the last one) and only the rule's features are
computed: their pre-activations first ((tokens, F) instead of (tokens, d_sae)). A top-k feature can only fire
where its pre-activation exceeds the threshold, so tokens where none does are settled without the full encoder;
the few candidate tokens left are encoded in full to check that the feature is among the token's top k, so
decisions are exactly those of the full SAE (the test checks this against `encode_labelled`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saescope.api.rules import Rule, RuleSet
from saescope.api.scope import Scope
from saescope.core.models import capture, token_strings


@dataclass
class Decision:
    index: int
    text: str
    positive: bool
    fired: list[dict] = field(default_factory=list)  # per firing feature: layer, feature, delta, (weight), tokens
    score: float | None = None  # a sparse or weighted rule's bias + what the features that fired add

    def record(self, rules_fingerprint: str, rule: str) -> dict:
        return {"index": self.index, "text": self.text, "decision": "positive" if self.positive else "negative",
                "rule": rule, "rules_fingerprint": rules_fingerprint, "fired": self.fired,
                **({"score": round(self.score, 6)} if self.score is not None else {})}


class RuleClassifier:
    """A rule of a RuleSet bound to the SAEs it was mined on (refused otherwise)."""

    def __init__(self, scope: Scope, rules: RuleSet, rule: str | None = None, *, sae_spec: str = "",
                 store=None, contexts: int = 3):
        self.scope, self.rules, self.rule = scope, rules, rules.rule(rule)
        rules.check_saes(scope.saes, sae_spec or rules.sae, scope.lm.name, layers=self.rule.layers)
        self.store, self.contexts = store, contexts
        self.by_layer: dict[int, list] = {}
        for f in dict.fromkeys(self.rule.features):  # a "both" rule lists a feature once per statistic it reads
            self.by_layer.setdefault(f.layer, []).append(f)
        self.candidate_tokens = 0
        self.tokens = 0
        self._evidence: dict[tuple[int, int], dict] = {}

    def evidence(self, layer: int, feature: int) -> dict | None:
        """The feature's top contexts and logit-lens tokens from the feature store, when one is given."""
        if self.store is None or layer not in self.store.layers:
            return None
        key = (layer, feature)
        if key not in self._evidence:
            got = self.store.feature(layer, feature, contexts=self.contexts)
            self._evidence[key] = {"frequency": got["frequency"], "promoted": [t for t, _ in got["promoted"][:8]],
                                   "contexts": ["".join(c["tokens"]) for c in got["contexts"]]}
        return self._evidence[key]

    @torch.no_grad()
    def _batch(self, texts: list[str], ids: list[list[int]]) -> list[Decision]:
        scope = self.scope
        enc = scope._pad(ids)
        acts = capture(scope.lm.model, enc["input_ids"], self.rule.layers, attention_mask=enc["attention_mask"])
        keep = enc["attention_mask"].bool().clone()
        keep[:, 0] &= enc["attention_mask"].sum(1) <= 1  # the first token out, as in mining (unless it is the only one)
        where = keep.nonzero()  # (tokens, 2): text row, position
        n_kept = keep.sum(1).tolist()
        self.tokens += len(where)
        fired: list[list[dict]] = [[] for _ in texts]
        # per text and firing feature: its max activation and its mean over the kept tokens (as mining pooled them)
        read: list[dict[tuple[int, int], dict[str, float]]] = [{} for _ in texts]
        strings: dict[int, list[str]] = {}  # token strings of the texts that fired, made once each
        for n, feats in self.by_layer.items():
            sae = scope.saes[n]
            x = acts[n][keep].float()
            idx = torch.tensor([f.feature for f in feats], device=x.device)
            pre = sae.pre_activations(x, idx)  # (tokens, F): only the rule's features
            # a little slack: the full encoder below, not this product, decides (their roundings may differ)
            cand = (pre > max(self.rules.threshold, 0.0) - 1e-3).any(1).nonzero()[:, 0]
            self.candidate_tokens += len(cand)
            if not len(cand):
                continue
            code = sae.encode(x[cand])  # the full encoder on candidates only: is the feature in the token's top k?
            hit = code.indices[:, :, None] == idx[None, None, :]  # (cand, k, F)
            act = (code.values[:, :, None].float() * hit).sum(1)  # (cand, F); 0 where not in the top k
            for j, f in enumerate(feats):
                on = (act[:, j] > self.rules.threshold).nonzero()[:, 0]
                if not len(on):
                    continue
                per_text: dict[int, list[tuple[int, float]]] = {}  # per text: (position, activation) where it fires
                for (row, pos), value in zip(where[cand[on]].tolist(), act[on, j].tolist(), strict=True):
                    per_text.setdefault(row, []).append((pos, value))
                for row, hits in per_text.items():
                    values = [v for _, v in hits]
                    stats = read[row][(n, f.feature)] = {"max": max(values), "mean": sum(values) / max(n_kept[row], 1)}
                    if row not in strings:
                        strings[row] = token_strings(scope.lm.tokenizer, ids[row])
                    toks = [{"position": pos, "activation": round(v, 4), "token": strings[row][pos]} for pos, v in hits]
                    entry = {"layer": n, "feature": f.feature, "delta": round(f.delta, 4), "tokens": toks}
                    entry.update(self._audit_terms(self.rule.terms(n, f.feature, stats), stats, n_kept[row]))
                    ev = self.evidence(n, f.feature)
                    if ev is not None:
                        entry["evidence"] = ev
                    fired[row].append(entry)
        out = []
        for i, t in enumerate(texts):  # indices set by the caller
            positive, score = self.rule.decide(read[i])
            out.append(Decision(i, t, positive, fired[i], score))
        return out

    def _audit_terms(self, terms: list, stats: dict[str, float], kept_tokens: int) -> dict:
        """What a firing feature adds to the score, for its audit record: a sparse rule's weight; a weighted or mean
        rule's weight x the statistic's activation / scale (flat); a "both" rule's terms, one per statistic read."""
        if self.rule.statistic is None:  # an OR rule (no terms) or a sparse one (a weight per feature)
            return {"weight": round(terms[0][1], 6)} if terms else {}
        # a mean is often a hundredth of a max: two more digits keep weight x it / scale to 1e-4
        digits = {"max": 4, "mean": 6}
        rows = [{"statistic": stat, "activation": round(stats[stat], digits[stat]), "weight": round(w, 6),
                 "scale": round(scale, digits[stat]), "contribution": round(c, 6)} for stat, w, scale, c in terms]
        mean = {"kept_tokens": kept_tokens} if "mean" in self.rule.term_reads else {}
        if self.rule.kind == "both":
            return {"terms": rows, "contribution": round(sum(c for *_, c in terms), 6), **mean}
        (row,) = rows
        return {"weight": row["weight"], f"{row['statistic']}_activation": row["activation"], "scale": row["scale"],
                "contribution": row["contribution"], **mean}

    def decisions(self, texts: Iterable[str], *, batch_size: int = 32, max_length: int = 256, total: int | None = None,
                  progress: bool = True, window: int = 32) -> Iterator[Decision]:
        """Decisions in input order. Texts are read `window` batches at a time and batched by length inside the
        window (less padding); memory is bounded by the window, not by the input."""
        bar = tqdm(total=total, desc="classify", unit="text", disable=not progress)
        chunk: list[str] = []
        start = 0

        def flush() -> Iterator[Decision]:
            ids = self.scope._token_ids(chunk, max_length)
            order = sorted(range(len(chunk)), key=lambda i: len(ids[i]))
            got: dict[int, Decision] = {}
            for b in range(0, len(order), batch_size):
                idx = order[b : b + batch_size]
                for i, d in zip(idx, self._batch([chunk[i] for i in idx], [ids[i] for i in idx]), strict=True):
                    d.index = start + i
                    got[i] = d
            bar.update(len(chunk))
            return (got[i] for i in range(len(chunk)))

        for text in texts:
            chunk.append(text)
            if len(chunk) == batch_size * window:
                yield from flush()
                start += len(chunk)
                chunk = []
        if chunk:
            yield from flush()
        bar.close()


def rules_fingerprint(rules: RuleSet) -> str:
    """A short hash of what the rules decide by (the SAEs they were mined on count by their fingerprints, not by where
    they are on disk)."""
    record = {k: v for k, v in rules.to_json().items() if k != "sae"}
    return hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


class AuditLog:
    """JSON lines, one per decision, written to PATH.partial and renamed into place when complete: a log that was
    cut short is never mistaken for a whole one."""

    def __init__(self, path: str | Path, rules: RuleSet, rule: Rule):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.fp, self.rule = rules_fingerprint(rules), rule.name
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.partial, "w", encoding="utf-8")

    def write(self, d: Decision) -> None:
        self.file.write(json.dumps(d.record(self.fp, self.rule), ensure_ascii=False) + "\n")

    def close(self) -> None:
        self.file.close()
        self.partial.replace(self.path)

    def abandon(self) -> None:
        self.file.close()
