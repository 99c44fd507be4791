"""Which SAE features fire on which texts of a labelled set, and how well a boolean prediction scores against its
labels: what rule mining (toxicity), coverage and selection (synthesis) all read.

    fires(f, text)  = the max activation of feature f over the text's tokens (the first left out) > threshold (0)

`FeatureHits` holds, per layer, which features fire on which texts as packed bits (a text x feature table of a
30-layer, 4,608-latent SAE set is 64 MB per 3,700 texts instead of 2 GB of floats), so that mining on subsets,
the mining-fraction curve and the transfer matrix re-use one LM pass per text. On request it also holds how strongly
they fire (`TextActivations`: each text's firing features with their max and mean activation over its tokens, in
compressed rows), what a rule that weighs activations reads.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from saescope.api.scope import Scope
from saescope.core.data.labelled import LabelledSet
from saescope.core.errors import SaescopeError
from saescope.core.files import atomic_write_bytes
from saescope.core.sae import SAE

STATISTICS = ("max", "mean")  # of a feature's activations over a text's kept tokens, what a weighted rule reads


@dataclass
class TextActivations:
    """Per text, the features that fire on it and how strongly, as compressed rows: text i's features are
    features[indptr[i]:indptr[i + 1]], with their max activation over its tokens in `values` and, when encoded with
    them, their mean over its kept tokens (0 where the feature does not fire) in `means` (float32: a bf16 or fp32
    activation is held exactly, so a rule decides here as it does on one text)."""

    indptr: np.ndarray  # (n + 1,) int64
    features: np.ndarray  # (entries,) int32
    values: np.ndarray  # (entries,) float32: max activations
    d_sae: int
    means: np.ndarray | None = None  # (entries,) float32: mean activations over the text's kept tokens

    @classmethod
    def from_entries(cls, rows: np.ndarray, features: np.ndarray, values: np.ndarray, n: int, d_sae: int,
                     means: np.ndarray | None = None) -> TextActivations:
        """From (text, feature, max activation[, mean activation]) entries in any order, one per firing (text, feature)."""
        order = np.argsort(rows, kind="stable")  # rows in text order; within a text, the order given
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        return cls(indptr, features[order].astype(np.int32), values[order].astype(np.float32), d_sae,
                   None if means is None else means[order].astype(np.float32))

    def _entry_rows(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.indptr) - 1), np.diff(self.indptr))

    def rows(self, mask: np.ndarray) -> TextActivations:
        keep = mask[self._entry_rows()]
        indptr = np.zeros(int(np.count_nonzero(mask)) + 1, dtype=np.int64)
        np.cumsum(np.diff(self.indptr)[mask], out=indptr[1:])
        return TextActivations(indptr, self.features[keep], self.values[keep], self.d_sae,
                               None if self.means is None else self.means[keep])

    def columns(self, features: Sequence[int] | np.ndarray, statistic: str = "max") -> np.ndarray:
        """(n_texts, len(features)) float64: each feature's max (or mean) activation on each text, 0 where it does not
        fire."""
        if statistic not in STATISTICS:
            raise SaescopeError(f"unknown statistic {statistic!r}; use {' or '.join(STATISTICS)}")
        if statistic == "mean" and self.means is None:
            raise SaescopeError("these activations hold no means: encode with activations=True")
        source = self.values if statistic == "max" else self.means
        wanted, inverse = np.unique(np.asarray(features, dtype=np.int64), return_inverse=True)
        position = np.full(self.d_sae, -1, dtype=np.int64)
        position[wanted] = np.arange(len(wanted))
        at = position[self.features]
        on = at >= 0
        out = np.zeros((len(self.indptr) - 1, len(wanted)))
        out[self._entry_rows()[on], at[on]] = source[on]
        return out[:, inverse.reshape(-1)]


@dataclass
class FeatureHits:
    """Per layer, (n_texts, ceil(d_sae / 8)) packed bits: whether each feature fires on each text; and, when encoded
    with activations, how strongly (`activations`, per layer: max and mean over the text's tokens)."""

    packed: dict[int, np.ndarray]
    d_sae: dict[int, int]
    n: int
    activations: dict[int, TextActivations] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.packed)

    def layer(self, n: int) -> np.ndarray:
        """(n_texts, d_sae) bool."""
        return np.unpackbits(self.packed[n], axis=1, count=self.d_sae[n]).astype(bool)

    def column(self, n: int, feature: int) -> np.ndarray:
        """(n_texts,) bool: the texts feature `feature` of layer n fires on."""
        return ((self.packed[n][:, feature >> 3] >> (7 - (feature & 7))) & 1).astype(bool)

    def activation(self, n: int, feature: int, statistic: str = "max") -> np.ndarray:
        """(n_texts,) float64: the max (or mean) activation of feature `feature` of layer n on each text (0 where it
        does not fire)."""
        if n not in self.activations:
            raise SaescopeError(f"these hits hold no activations for layer {n}: encode with activations=True")
        return self.activations[n].columns([feature], statistic)[:, 0]

    def rows(self, mask: np.ndarray) -> FeatureHits:
        return FeatureHits({n: p[mask] for n, p in self.packed.items()}, dict(self.d_sae), int(np.count_nonzero(mask)),
                           {n: a.rows(mask) for n, a in self.activations.items()})


@dataclass
class EncodedSet:
    """One LM pass over a labelled set: feature hits per SAE set ("sae", "control") and the mean-pooled residual
    stream per layer (float16: only a baseline probe reads it)."""

    data: LabelledSet
    hits: dict[str, FeatureHits]
    residual: dict[int, torch.Tensor] = field(default_factory=dict)

    def subset(self, mask: np.ndarray) -> EncodedSet:
        m = torch.as_tensor(mask)
        return EncodedSet(self.data.subset(mask), {k: h.rows(mask) for k, h in self.hits.items()},
                          {n: r[m] for n, r in self.residual.items()})


def encode_labelled(scope: Scope, data: LabelledSet, *, layers: Sequence[int] | None = None,
                    control: dict[int, SAE] | None = None, threshold: float = 0.0, residual: bool = True,
                    activations: bool = False, batch_size: int = 32, max_length: int = 256,
                    progress: bool = True) -> EncodedSet:
    """Feature hits (max over each text's tokens, the first left out, > threshold) of the SAEs and of `control`,
    with `activations` their max and mean activations too, and the mean-pooled residual, from one LM pass per batch."""
    layers = scope.check_layers(list(layers) if layers else None)
    sets = {"sae": {n: scope.saes[n] for n in layers}}
    if control is not None:
        sets["control"] = {n: control[n] for n in layers}
    n_texts = len(data)
    packed = {name: {n: np.zeros((n_texts, (s[n].cfg.d_sae + 7) // 8), dtype=np.uint8) for n in layers}
              for name, s in sets.items()}
    res = {n: torch.zeros(n_texts, scope.lm.d_model, dtype=torch.float16) for n in layers} if residual else {}
    # (texts, features, max activations, mean activations) of the firing pairs, per SAE set and layer, gathered batch
    # by batch
    entries: dict[str, dict[int, tuple[list, list, list, list]]] = (
        {name: {n: ([], [], [], []) for n in layers} for name in sets} if activations else {})
    for idx, got in scope.iter_pooled(data.texts, layers=layers, pool="max+mean" if activations else "max",
                                      residual_pool="mean", skip_first_token=True, sae_sets=sets, with_residual=residual,
                                      batch_size=batch_size, max_length=max_length, progress=progress,
                                      desc=f"encode {data.name}"):
        rows = np.asarray(idx)
        for name in sets:
            for n in layers:
                pooled, means = got[name][n] if activations else (got[name][n], None)
                fires = (pooled > threshold).cpu().numpy()
                packed[name][n][rows] = np.packbits(fires, axis=1)
                if activations:  # only the firing pairs leave the device, as float32 (int32 indices: 16 bytes a pair)
                    r, f = np.nonzero(fires)
                    at = torch.as_tensor(r, device=pooled.device), torch.as_tensor(f, device=pooled.device)
                    for part, got_part in zip(entries[name][n], (rows[r].astype(np.int32), f.astype(np.int32),
                                                                 pooled[at].float().cpu().numpy(),
                                                                 means[at].float().cpu().numpy()), strict=True):
                        part.append(got_part)
        for n in res:
            res[n][torch.as_tensor(idx)] = got["residual"][n].cpu().half()
    acts = {name: {n: _gathered(parts, n_texts, sets[name][n].cfg.d_sae) for n, parts in per_layer.items()}
            for name, per_layer in entries.items()}
    hits = {name: FeatureHits(packed[name], {n: s[n].cfg.d_sae for n in layers}, n_texts, acts.get(name, {}))
            for name, s in sets.items()}
    return EncodedSet(data, hits, res)


ENCODED_FORMAT = "saescope-encoded-hits-1"


def save_encoded(path: Path, enc: EncodedSet, key: dict) -> None:
    """Write an EncodedSet's hits, activations and residuals (not its texts) with `key`, what they were encoded from and
    with; `load_encoded` gives them back only under an equal key. Written whole or not at all."""
    arrays: dict[str, np.ndarray] = {}
    for name, h in enc.hits.items():
        for n in h.layers:
            arrays[f"{name}/{n}/packed"] = h.packed[n]
            if n in h.activations:
                a = h.activations[n]
                arrays.update({f"{name}/{n}/indptr": a.indptr, f"{name}/{n}/features": a.features, f"{name}/{n}/values": a.values})
                if a.means is not None:
                    arrays[f"{name}/{n}/means"] = a.means
    for n, r in enc.residual.items():
        arrays[f"residual/{n}"] = r.numpy()
    meta = {"format": ENCODED_FORMAT, "key": key, "n": len(enc.data),
            "d_sae": {name: {str(n): d for n, d in h.d_sae.items()} for name, h in enc.hits.items()}}
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_encoded(path: Path, data: LabelledSet, key: dict) -> EncodedSet | None:
    """What `save_encoded` wrote at `path`, as the EncodedSet of `data`, when its key equals `key` and it holds as many
    texts; None otherwise (no file, another key, an unreadable file): the caller encodes afresh."""
    try:
        with np.load(path) as z:
            meta = json.loads(z["__meta__"].tobytes())
            if meta.get("format") != ENCODED_FORMAT or meta.get("key") != key or meta.get("n") != len(data):
                return None
            arrays = {name: z[name] for name in z.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # unreadable: encoded afresh, never a traceback
        return None
    hits = {}
    for name, widths in meta["d_sae"].items():
        d_sae = {int(n): int(d) for n, d in widths.items()}
        acts = {n: TextActivations(arrays[f"{name}/{n}/indptr"], arrays[f"{name}/{n}/features"], arrays[f"{name}/{n}/values"],
                                   d_sae[n], arrays.get(f"{name}/{n}/means")) for n in d_sae if f"{name}/{n}/indptr" in arrays}
        hits[name] = FeatureHits({n: arrays[f"{name}/{n}/packed"] for n in d_sae}, d_sae, len(data), acts)
    residual = {int(k.split("/")[1]): torch.from_numpy(v) for k, v in arrays.items() if k.startswith("residual/")}
    return EncodedSet(data, hits, residual)


def _gathered(parts: tuple[list, list, list, list], n_texts: int, d_sae: int) -> TextActivations:
    """TextActivations from the (texts, features, max and mean activations) arrays gathered batch by batch."""
    rows, features, values, means = (np.concatenate(p) if p else np.zeros(0, dtype=dtype)
                                     for p, dtype in zip(parts, (np.int32, np.int32, np.float32, np.float32), strict=True))
    return TextActivations.from_entries(rows, features, values, n_texts, d_sae, means)


def feature_deltas(hits: FeatureHits, labels: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per layer: (delta, P(fire | positive), P(fire | negative)) per feature."""
    pos = labels.astype(bool)
    out = {}
    for n in hits.layers:
        table = hits.layer(n)
        p_pos, p_neg = table[pos].mean(0), table[~pos].mean(0)
        out[n] = (p_pos - p_neg, p_pos, p_neg)
    return out


def scores(pred: np.ndarray, labels: np.ndarray) -> dict:
    """Precision, recall, F1, accuracy and balanced accuracy of boolean predictions (positive = 1)."""
    pos = labels == 1
    tp, fp = int(np.count_nonzero(pred & pos)), int(np.count_nonzero(pred & ~pos))
    fn = int(np.count_nonzero(~pred & pos))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    n_neg = int(np.count_nonzero(~pos))
    specificity = (n_neg - fp) / n_neg if n_neg else 0.0
    # balanced accuracy: 0.5 for any constant answer, whatever the class balance (F1 is not: on a set 70% positive,
    # calling everything positive has F1 0.82)
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": float(np.mean(pred == pos)),
            "balanced_accuracy": (recall + specificity) / 2,
            "n": int(len(labels)), "n_positive": int(np.count_nonzero(pos)), "predicted_positive": int(np.count_nonzero(pred))}
