"""Which SAE features fire on which texts of a labelled set, and how well a boolean prediction scores against its
labels: what rule mining (toxicity), coverage and selection (synthesis) all read.

    fires(f, text)  = the max activation of feature f over the text's tokens (the first left out) > threshold (0)

`FeatureHits` holds, per layer, which features fire on which texts as packed bits (a text x feature table of a
30-layer, 4,608-latent SAE set is 64 MB per 3,700 texts instead of 2 GB of floats), so that mining on subsets,
the mining-fraction curve and the transfer matrix re-use one LM pass per text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from saescope.api.scope import Scope
from saescope.core.data.labelled import LabelledSet
from saescope.core.sae import SAE


@dataclass
class FeatureHits:
    """Per layer, (n_texts, ceil(d_sae / 8)) packed bits: whether each feature fires on each text."""

    packed: dict[int, np.ndarray]
    d_sae: dict[int, int]
    n: int

    @property
    def layers(self) -> list[int]:
        return sorted(self.packed)

    def layer(self, n: int) -> np.ndarray:
        """(n_texts, d_sae) bool."""
        return np.unpackbits(self.packed[n], axis=1, count=self.d_sae[n]).astype(bool)

    def column(self, n: int, feature: int) -> np.ndarray:
        """(n_texts,) bool: the texts feature `feature` of layer n fires on."""
        return ((self.packed[n][:, feature >> 3] >> (7 - (feature & 7))) & 1).astype(bool)

    def rows(self, mask: np.ndarray) -> FeatureHits:
        return FeatureHits({n: p[mask] for n, p in self.packed.items()}, dict(self.d_sae), int(np.count_nonzero(mask)))


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
                    batch_size: int = 32, max_length: int = 256, progress: bool = True) -> EncodedSet:
    """Feature hits (max over each text's tokens, the first left out, > threshold) of the SAEs and of `control`,
    and the mean-pooled residual, from one LM pass per batch."""
    layers = scope.check_layers(list(layers) if layers else None)
    sets = {"sae": {n: scope.saes[n] for n in layers}}
    if control is not None:
        sets["control"] = {n: control[n] for n in layers}
    n_texts = len(data)
    packed = {name: {n: np.zeros((n_texts, (s[n].cfg.d_sae + 7) // 8), dtype=np.uint8) for n in layers}
              for name, s in sets.items()}
    res = {n: torch.zeros(n_texts, scope.lm.d_model, dtype=torch.float16) for n in layers} if residual else {}
    for idx, got in scope.iter_pooled(data.texts, layers=layers, pool="max", residual_pool="mean", skip_first_token=True,
                                      sae_sets=sets, with_residual=residual, batch_size=batch_size, max_length=max_length,
                                      progress=progress, desc=f"encode {data.name}"):
        rows = np.asarray(idx)
        for name in sets:
            for n in layers:
                packed[name][n][rows] = np.packbits((got[name][n] > threshold).cpu().numpy(), axis=1)
        for n in res:
            res[n][torch.as_tensor(idx)] = got["residual"][n].cpu().half()
    hits = {name: FeatureHits(packed[name], {n: s[n].cfg.d_sae for n in layers}, n_texts) for name, s in sets.items()}
    return EncodedSet(data, hits, res)


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
