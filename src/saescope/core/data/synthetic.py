"""Activations built from known features: the ground truth an SAE's features can be counted against (Korznikov et al.
2026, SAELens's SynthSAEBench). Synthetic by design: the real-model figures stand beside it.

    x = offset + sum_i fires_i * magnitude_i * f_i + noise,          f_i unit directions in R^d, N >> d (superposition)

- firing: feature i fires with its own probability p_i, a power law in its rank (p_i proportional to (i + 1)^-alpha),
  scaled so that `mean_active` features fire per sample on average;
- magnitudes: drawn per firing, |N(1, magnitude_sd)| (floored at 0.1);
- correlation: `correlated_pairs` pairs of features whose firing comes from Gaussians of correlation `rho` (a copula:
  each keeps its own probability);
- hierarchy: `hierarchical_pairs` (parent, child) pairs where the child fires only when its parent does (with
  probability `child_given_parent`): the structure behind feature absorption;
- noise: isotropic Gaussian of standard deviation `noise` per dimension; an `offset` vector shared by every sample
  (residual streams have a large mean; an SAE's b_dec should take it).

The directions, probabilities, pairs and offset are drawn from `seed` alone; samples from a generator of their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from saescope.core.schema import Config, config_field


@dataclass(kw_only=True)
class SyntheticConfig(Config):
    """A ground-truth activation distribution (see the module doc)."""

    d: int = config_field(128, "dimensions of the activations", min=2)
    n_features: int = config_field(1024, "true features (8x d: superposition)", min=2)
    mean_active: float = config_field(6.0, "features firing per sample, on average", min=0, min_open=True)
    alpha: float = config_field(0.5, "power-law exponent of the firing probabilities over the features' ranks", min=0)
    magnitude_sd: float = config_field(0.3, "standard deviation of a firing's magnitude (mean 1)", min=0)
    correlated_pairs: int = config_field(64, "pairs of features whose firing is correlated", min=0)
    rho: float = config_field(0.6, "the correlation of a correlated pair's firing Gaussians", min=-1, max=1)
    hierarchical_pairs: int = config_field(64, "(parent, child) pairs: the child fires only when its parent does", min=0)
    child_given_parent: float = config_field(0.4, "how often a child fires when its parent does", min=0, max=1)
    noise: float = config_field(0.02, "standard deviation of the noise per dimension", min=0)
    offset: float = config_field(1.0, "norm of the mean vector every sample shares", min=0)
    seed: int = config_field(0, "the features, their probabilities and pairs", min=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        from saescope.core.errors import ParamError

        if 2 * (self.correlated_pairs + self.hierarchical_pairs) > self.n_features:
            raise ParamError("{} + {} pairs need twice as many features as {} gives", "correlated_pairs",
                             "hierarchical_pairs", "n_features")
        if self.mean_active > self.n_features:
            raise ParamError("{} cannot exceed {}", "mean_active", "n_features")


class SyntheticFeatures:
    """The features of a SyntheticConfig and samples of activations built from them."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        n, d = cfg.n_features, cfg.d
        self.directions = torch.randn(n, d, generator=g, dtype=torch.float64)
        self.directions /= self.directions.norm(dim=1, keepdim=True)
        self.offset = torch.randn(d, generator=g, dtype=torch.float64)
        self.offset *= cfg.offset / self.offset.norm().clamp_min(1e-12)
        order = torch.randperm(n, generator=g)  # which feature gets which rank: the pairs are spread over all ranks
        self.parents = order[: cfg.hierarchical_pairs]
        self.children = order[cfg.hierarchical_pairs: 2 * cfg.hierarchical_pairs]
        start = 2 * cfg.hierarchical_pairs
        self.correlated = order[start: start + 2 * cfg.correlated_pairs].reshape(-1, 2)
        rank = torch.empty(n, dtype=torch.float64)
        rank[torch.randperm(n, generator=g)] = torch.arange(n, dtype=torch.float64)
        self.probability = self._probabilities((rank + 1).pow(-cfg.alpha))

    def _probabilities(self, weights: Tensor) -> Tensor:
        """Weights scaled so that the expected number firing is mean_active (a child's own is p(parent) x q), none
        above 1."""
        cfg = self.cfg
        p = weights.clone()
        for _ in range(50):  # scale, clip at 1, repeat: converges in a few rounds
            expected = p.sum() - p[self.children].sum() + (p[self.parents] * cfg.child_given_parent).sum()
            p = (p * (cfg.mean_active / expected)).clamp(max=1.0)
        return p

    def effective_probability(self) -> Tensor:
        """How often each feature fires (a child: its parent's probability x child_given_parent)."""
        p = self.probability.clone()
        p[self.children] = self.probability[self.parents] * self.cfg.child_given_parent
        return p

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(activations (n, d) float32, true feature activations (n, n_features) float32: magnitude where firing)."""
        cfg = self.cfg
        z = torch.randn(n, cfg.n_features, generator=generator, dtype=torch.float64)
        if len(self.correlated):
            a, b = self.correlated[:, 0], self.correlated[:, 1]
            z[:, b] = cfg.rho * z[:, a] + math.sqrt(1 - cfg.rho**2) * z[:, b]
        cut = torch.special.ndtri(self.probability.clamp(1e-12, 1 - 1e-12))  # P(z < cut) = p
        fires = z < cut
        fires[:, self.probability >= 1] = True
        if len(self.children):
            child_draw = torch.rand(n, len(self.children), generator=generator, dtype=torch.float64)
            fires[:, self.children] = fires[:, self.parents] & (child_draw < cfg.child_given_parent)
        magnitude = (1 + cfg.magnitude_sd * torch.randn(n, cfg.n_features, generator=generator, dtype=torch.float64)).abs()
        coefficients = torch.where(fires, magnitude.clamp_min(0.1), torch.zeros((), dtype=torch.float64))
        x = coefficients @ self.directions + self.offset
        if cfg.noise:
            x += cfg.noise * torch.randn(n, cfg.d, generator=generator, dtype=torch.float64)
        return x.float(), coefficients.float()

    def batches(self, n: int, generator: torch.Generator, batch: int = 65_536):
        """n samples in batches of at most `batch` (memory: batch x n_features doubles per batch)."""
        done = 0
        while done < n:
            take = min(batch, n - done)
            yield self.sample(take, generator)
            done += take
