"""Masked flash attention for rcm-jax: forward, backward and fused forward+JVP kernels, and an XLA reference."""
from pallas_kernels import reference
from pallas_kernels.mask import Mask

__all__ = ["Mask", "reference"]
