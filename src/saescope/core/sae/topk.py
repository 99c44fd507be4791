"""The top-k SAE: Gao et al. (2024), "Scaling and evaluating sparse autoencoders" (arXiv:2406.04093), the kind of
Qwen-Scope's released SAEs. Decode, FVU, AuxK, the initialisation and the decoder-norm constraint are every kind's
(saescope.core.sae.base); what is top-k's own is the selection:

    encode:  z = TopK_k(ReLU(W_enc x + b_enc))                      W_enc: (d_sae, d_model), exactly k latents per token

`reference_encode` below is this maths written plainly with torch ops (reference_decode is in base). TopKSAE runs
the same maths through the fast path of `saescope.core.sae.fast` (sparse backwards, blockwise or fused-kernel top-k,
a reused pre-activation buffer); `TopKSAE.fused = False` switches to the reference, and tests/sae/test_fast.py
checks that both give the same codes, losses and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from saescope.core.sae.base import SAE, SparseCode
from saescope.core.sae.fast import Workspace, fused_topk_encode


# ---- the maths, plainly: the reference that saescope.core.sae.fast is tested against ----
def reference_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, *, compute_dtype: torch.dtype | None = None,
                     dead: Tensor | None = None, k_aux: int = 0) -> tuple[SparseCode, SparseCode | None]:
    """z = TopK_k(ReLU(W_enc x + b_enc)) of each token; with `dead` (d_sae,) bool and k_aux > 0 also the AuxK
    code, the top k_aux among the dead latents only (else None). The matmul and top-k run in compute_dtype
    (W_enc's by default), the values come back in W_enc's dtype."""
    cd = compute_dtype or W_enc.dtype
    pre = F.linear(x.to(cd), W_enc.to(cd), b_enc.to(cd))  # W_enc x + b_enc: (..., d_sae)
    code = _top_k_relu(pre, k, W_enc.dtype)
    if dead is None or k_aux == 0:
        return code, None
    return code, _top_k_relu(pre.masked_fill(~dead, float("-inf")), k_aux, W_enc.dtype)


def _top_k_relu(pre: Tensor, k: int, dtype: torch.dtype) -> SparseCode:
    # ReLU after top-k gives the same z as ReLU before it (it only changes which of several zeros are kept)
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return SparseCode(indices, values.to(dtype).relu())


class TopKSAE(SAE):
    """z = TopK_k(ReLU(W_enc x + b_enc)): exactly k latents per token (Gao et al.; Qwen-Scope's released SAEs)."""

    kind = "topk"

    # ---- the maths (each step: the fast path, or the reference above when self.fused is False) ----
    def encode(self, x: Tensor) -> SparseCode:
        """z = TopK_k(ReLU(W_enc x + b_enc)) of each token (..., d_model): its k kept latents and their values."""
        x = self.encoder_input(x)
        if not self.fused:
            return reference_encode(x, self.W_enc, self.b_enc, self.cfg.k, compute_dtype=self.compute_dtype)[0]
        fast = fused_topk_encode(x, self.W_enc, self.b_enc, k=self.cfg.k, compute_dtype=self.compute_dtype)
        return SparseCode(fast.indices, fast.values)

    def train_code(self, x: Tensor, dead: Tensor | None, k_aux: int, workspace: Workspace | None,
                   keep: Tensor | None = None) -> tuple[SparseCode, SparseCode | None]:
        """The code of x (tokens, d_model) and, when k_aux > 0, the AuxK code among the `dead` latents."""
        if not self.fused:
            return reference_encode(self.encoder_input(x), self.W_enc, self.b_enc, self.cfg.k,
                                    compute_dtype=self.compute_dtype, dead=dead, k_aux=k_aux)
        fast = fused_topk_encode(x, self.W_enc, self.b_enc, k=self.cfg.k, compute_dtype=self.compute_dtype,
                                 dead=dead, k_aux=k_aux, workspace=workspace, centre=self.b_dec if self.centred else None,
                                 with_groups=torch.is_grad_enabled() and self.W_enc.requires_grad)
        aux = SparseCode(fast.aux_indices, fast.aux_values) if k_aux > 0 else None
        return SparseCode(fast.indices, fast.values, fast.groups), aux
