"""The SAE maths: encode, decode, losses. No I/O, no model code."""

from saescope.core.sae.fast import Workspace, latent_weighted_sum
from saescope.core.sae.topk import ForwardOutput, SAEConfig, SparseCode, TopKSAE, default_lr

__all__ = ["ForwardOutput", "SAEConfig", "SparseCode", "TopKSAE", "Workspace", "default_lr", "latent_weighted_sum"]
from saescope.core.sae.random_control import is_control, principal_basis, random_like  # noqa: E402

__all__ += ["is_control", "principal_basis", "random_like"]
