"""A sample of a model's residual-stream activations from a corpus, for the checks that need data
(principal subspaces for controls, activation correlations between SAEs).

`OutlierFilter` is the one L2-norm outlier filter of every reader of activations (the trainer, evaluation, the
feature store, these samples): tokens whose norm exceeds `outlier_factor` x the running median norm (mostly the
attention-sink first token, hundreds of times the typical norm) are left out: a few of them would otherwise
dominate every loss, variance and correlation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saescope.core.data import batches, iter_texts
from saescope.core.errors import SaescopeError
from saescope.core.models import LoadedModel, capture


class OutlierFilter:
    """Keeps the tokens whose norm is at most `factor` x the median of the last WINDOW batch-median norms (the
    first batch: its own median). factor 0 keeps every token. One filter per layer, fed every batch in order;
    its state (`medians`, `count`) is saved with a training checkpoint, so a resumed run filters as before."""

    WINDOW = 256

    def __init__(self, factor: float, device: torch.device | str | None = None) -> None:
        self.factor = factor
        self.medians = torch.zeros(self.WINDOW, device=device)  # a ring buffer, on the device: no host sync per step
        self.count = 0

    def keep(self, x: Tensor, gather: Callable[[Tensor], Tensor] | None = None, norms: Tensor | None = None) -> Tensor:
        """Boolean mask of the rows of x (tokens, d) to keep. `gather` collects the norms of every rank (data-parallel
        training), so that all ranks filter by the same median; `norms`, x's row norms where the caller has them."""
        norms = x.norm(dim=1) if norms is None else norms
        if self.factor <= 0:
            return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        self.medians[self.count % self.WINDOW] = (norms if gather is None else gather(norms)).median()
        self.count += 1
        return norms <= self.factor * self.medians[: min(self.count, self.WINDOW)].median()


@torch.no_grad()
def sample_activations(lm: LoadedModel, layers: list[int], *, data: str | None = None, text_column: str = "text",
                       n_tokens: int = 8192, ctx_len: int = 256, batch_size: int = 8, outlier_factor: float = 5.0,
                       split: str = "eval", desc: str = "activations") -> dict[int, Tensor]:
    """Per layer, (about n_tokens, d_model) float32 activations on the CPU from the held-out split."""
    if n_tokens <= 0:
        raise SaescopeError(f"n_tokens must be positive, got {n_tokens}")
    stream = batches(iter_texts(data, text_column=text_column, split=split), lm.tokenizer, ctx_len=ctx_len,
                     batch_size=batch_size, seed=4321, shuffle_buffer=1)
    got: dict[int, list[Tensor]] = {n: [] for n in layers}
    filters = {n: OutlierFilter(outlier_factor) for n in layers}
    n_batches = math.ceil(n_tokens / (ctx_len * batch_size))
    done = 0
    for ids in tqdm(stream, total=n_batches, desc=desc, unit="batch", dynamic_ncols=True):
        acts = capture(lm.model, ids.to(lm.device), layers)
        for n in layers:
            x = acts[n].reshape(-1, acts[n].shape[-1]).float()
            got[n].append(x[filters[n].keep(x)].cpu())
        done += 1
        if done >= n_batches:
            break
    if done == 0:
        raise SaescopeError("no activation data: the corpus split is smaller than one batch")
    return {n: torch.cat(v)[:n_tokens] for n, v in got.items()}
