"""Masked flash attention for rcm-jax: forward, backward and fused forward+JVP kernels, and an XLA reference.

`flash_attention(q, k, v, mask=None, *, sm_scale=None, interpret=None, implementation="pallas")`:
block-sparse masked attention that works under jit, grad, jvp and jax.checkpoint; `implementation="xla"`
selects the XLA reference instead. `flash_attention_stacked`: forward-only, against one entry of a stack of
k/v (a streaming KV cache of every layer, read in place on Hopper). `Mask`: static masks (dense or union of
rectangles); `KeyIntervals`: a run-time mask with the same key intervals in every row
(`flash_attention_stacked`). `reference`: the XLA ground truth. Files: mask.py (Mask, tile schedules), kernels.py
(Pallas kernels), attention.py (op).
"""
from pallas_kernels import reference
from pallas_kernels.attention import RESIDUAL_NAMES, SUPPORTED_HEAD_DIMS, flash_attention, flash_attention_stacked
from pallas_kernels.kernels import BlockSizes, KernelConfig
from pallas_kernels.mask import KeyIntervals, Mask

__all__ = ["BlockSizes", "KernelConfig", "KeyIntervals", "Mask", "RESIDUAL_NAMES", "SUPPORTED_HEAD_DIMS",
           "flash_attention", "flash_attention_stacked", "reference"]
