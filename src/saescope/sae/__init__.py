"""The SAE maths: encode, decode, losses. No I/O, no model code."""

from saescope.sae.topk import ForwardOutput, SAEConfig, SparseCode, TopKSAE, default_lr, latent_weighted_sum

__all__ = ["ForwardOutput", "SAEConfig", "SparseCode", "TopKSAE", "default_lr", "latent_weighted_sum"]
