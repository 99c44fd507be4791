"""A sample of a model's residual-stream activations from a corpus, for the checks that need data
(principal subspaces for controls, activation correlations between SAEs).

Tokens whose norm exceeds `outlier_factor` x the batch median (mostly the attention-sink first
token, hundreds of times the typical norm) are left out, as the trainer leaves them out: a few of
them would otherwise dominate every variance and correlation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saescope.data import batches, iter_texts
from saescope.errors import SaescopeError
from saescope.models import LoadedModel, capture


def keep_typical(x: Tensor, outlier_factor: float) -> Tensor:
    """Boolean mask of the rows of x (tokens, d) whose norm is at most outlier_factor x the median norm."""
    norms = x.norm(dim=1)
    if outlier_factor <= 0:
        return torch.ones_like(norms, dtype=torch.bool)
    return norms <= outlier_factor * norms.median()


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
    n_batches = math.ceil(n_tokens / (ctx_len * batch_size))
    done = 0
    for ids in tqdm(stream, total=n_batches, desc=desc, unit="batch", dynamic_ncols=True):
        acts = capture(lm.model, ids.to(lm.device), layers)
        for n in layers:
            x = acts[n].reshape(-1, acts[n].shape[-1]).float()
            got[n].append(x[keep_typical(x, outlier_factor)].cpu())
        done += 1
        if done >= n_batches:
            break
    if done == 0:
        raise SaescopeError("no activation data: the corpus split is smaller than one batch")
    return {n: torch.cat(v)[:n_tokens] for n, v in got.items()}
