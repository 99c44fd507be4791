"""The SAE maths: encode, decode, losses, for every kind (base.SAE is their shared interface). No I/O, no model code."""

from saescope.core.errors import SaescopeError
from saescope.core.sae.base import SAE, ForwardOutput, SAEConfig, SparseCode, default_lr
from saescope.core.sae.fast import Workspace, latent_weighted_sum
from saescope.core.sae.kinds import BatchTopKSAE, GatedSAE, JumpReLUSAE, MatryoshkaSAE, ReLUSAE
from saescope.core.sae.topk import TopKSAE

SAE_KINDS: dict[str, type[SAE]] = {cls.kind: cls for cls in (TopKSAE, BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, ReLUSAE, GatedSAE)}
TRAINABLE_KINDS = ("topk", "batchtopk", "jumprelu", "matryoshka")


def make_sae(cfg: SAEConfig, **kw) -> SAE:
    """An SAE of the kind cfg.kind (its parameters uninitialised: init_tied, or copy weights in)."""
    if cfg.kind not in SAE_KINDS:
        raise SaescopeError(f"unknown SAE kind {cfg.kind!r}; known: {', '.join(SAE_KINDS)}")
    return SAE_KINDS[cfg.kind](cfg, **kw)


__all__ = ["SAE", "SAE_KINDS", "TRAINABLE_KINDS", "BatchTopKSAE", "ForwardOutput", "GatedSAE", "JumpReLUSAE", "MatryoshkaSAE",
           "ReLUSAE", "SAEConfig", "SparseCode", "TopKSAE", "Workspace", "default_lr", "latent_weighted_sum", "make_sae"]
from saescope.core.sae.random_control import is_control, principal_basis, random_like  # noqa: E402

__all__ += ["is_control", "principal_basis", "random_like"]
