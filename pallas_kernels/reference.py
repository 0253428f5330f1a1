"""XLA reference attention: the ground truth for kernel tests and a fallback the user can select.

Materialises the [Lq, Lk] scores, so it is for short sequences only. Differentiable in both modes
(plain jnp), computes softmax statistics in fp32, and returns zeros for fully masked query rows.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.mask import Mask


def attention(q, k, v, mask: Mask | None = None, *, sm_scale: float | None = None):
  """q: [B, Lq, H, D], k/v: [B, Lk, Hkv, D] with Hkv | H -> [B, Lq, H, D] in q.dtype."""
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  if h % hkv:
    raise ValueError(f"attention: q heads ({h}) must be a multiple of k/v heads ({hkv}).")
  if mask is not None and mask.shape != (lq, lk):
    raise ValueError(f"attention: mask shape {mask.shape} != (Lq, Lk) = {(lq, lk)}.")
  scale = d ** -0.5 if sm_scale is None else sm_scale
  acc = jnp.promote_types(q.dtype, jnp.float32)
  qg = q.reshape(b, lq, hkv, h // hkv, d).astype(acc)
  s = jnp.einsum("bqgrd,bkgd->bgrqk", qg, k.astype(acc)) * scale
  if mask is not None:
    m = jnp.asarray(mask.to_dense())
    s = jnp.where(m, s, -jnp.inf)
    row_any = m.any(axis=-1)[:, None]  # [Lq, 1]
    s = jnp.where(row_any, s, 0.0)
  p = jax.nn.softmax(s, axis=-1)
  if mask is not None:
    p = jnp.where(row_any, p, 0.0)
  o = jnp.einsum("bgrqk,bkgd->bqgrd", p, v.astype(acc))
  return o.reshape(b, lq, h, d).astype(q.dtype)
