"""The one attention entry point of rcm-jax: every layer calls `attention`, and `impl` picks the backend.

- "xla": `pallas_kernels.reference.attention` (materialises [Lq, Lk]; any mask; CPU and short sequences).
- "pallas": `pallas_kernels.flash_attention` (masked flash kernel with custom grad/JVP rules; GPU).
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, unmasked only (bidirectional teacher on GPU).
"""
from __future__ import annotations

import jax

from pallas_kernels import reference
from pallas_kernels.mask import Mask

IMPLS = ("xla", "pallas", "cudnn")


def attention(q, k, v, mask: Mask | None = None, *, impl: str = "xla"):
  """q: [B, Lq, H, D], k/v: [B, Lk, Hkv, D] (Hkv | H) -> [B, Lq, H, D] in q.dtype; softmax scale D**-0.5.

  mask: a static `pallas_kernels.Mask` of shape [Lq, Lk] (True = may attend), or None for full attention.
  """
  if impl == "xla":
    return reference.attention(q, k, v, mask)
  if impl == "pallas":
    from pallas_kernels import flash_attention  # lazy: the kernel lives in its own package and may be absent
    return flash_attention(q, k, v, mask)
  if impl == "cudnn":
    if mask is not None:
      raise ValueError("attention impl 'cudnn' supports no mask; use impl='pallas' (or 'xla') for masked "
                       "attention.")
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  raise ValueError(f"unknown attention impl {impl!r}; use one of {IMPLS}.")
