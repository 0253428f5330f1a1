"""3D rotary position embedding of Wan2.1: head_dim split into frame / height / width parts.

Split (Wan): frame part d - 4*(d//6), height and width parts 2*(d//6) each (d = 128 -> 44, 42, 42). Each
part rotates interleaved pairs `(x[2j], x[2j+1])` by `pos * theta**(-2j / part)`, as diffusers'
`get_1d_rotary_pos_embed(..., repeat_interleave_real=True)` and Wan's complex `rope_apply` do.

Angles are tabulated in float64 (numpy) for positions 0..rope_max_seq_len-1 and gathered, so traced frame
positions (teacher forcing's shared positions, a KV-cache chunk's offset) cost a gather, not recomputation.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def rope_split(head_dim: int) -> tuple[int, int, int]:
  """(frame, height, width) channel counts of the head dimension."""
  hw = 2 * (head_dim // 6)
  return head_dim - 2 * hw, hw, hw


def _angles(part: int, max_len: int, theta: float) -> np.ndarray:
  """float64[max_len, part // 2]: position * inverse frequency."""
  inv_freq = 1.0 / theta ** (np.arange(0, part, 2, dtype=np.float64) / part)
  return np.outer(np.arange(max_len, dtype=np.float64), inv_freq)


def rope_tables(frame_positions, height: int, width: int, *, head_dim: int, theta: float = 10000.0,
                max_len: int = 1024):
  """cos, sin: float32[F * height * width, head_dim // 2] for tokens ordered (frame, row, column).

  frame_positions: int[F] RoPE frame index per (post-patch) frame, numpy or traced.
  """
  d_t, d_h, d_w = rope_split(head_dim)
  if height > max_len or width > max_len:
    raise ValueError(f"rope_max_seq_len ({max_len}) must be >= the patch grid {height} x {width}.")
  if isinstance(frame_positions, np.ndarray) and frame_positions.size and (
      frame_positions.min() < 0 or frame_positions.max() >= max_len):
    raise ValueError(f"frame_positions must lie in [0, rope_max_seq_len={max_len}), got "
                     f"[{frame_positions.min()}, {frame_positions.max()}].")
  num_frames = frame_positions.shape[0]
  shape = (num_frames, height, width)
  out = []
  for fn in (np.cos, np.sin):  # tabulated in float64, rounded once to float32, as diffusers' buffers
    tab_t = jnp.take(jnp.asarray(fn(_angles(d_t, max_len, theta)), jnp.float32), jnp.asarray(frame_positions),
                     axis=0)                                             # [F, d_t/2]
    tab_h = jnp.asarray(fn(_angles(d_h, height, theta)), jnp.float32)    # [Hp, d_h/2]
    tab_w = jnp.asarray(fn(_angles(d_w, width, theta)), jnp.float32)     # [Wp, d_w/2]
    out.append(jnp.concatenate([
        jnp.broadcast_to(tab_t[:, None, None, :], shape + (d_t // 2,)),
        jnp.broadcast_to(tab_h[None, :, None, :], shape + (d_h // 2,)),
        jnp.broadcast_to(tab_w[None, None, :, :], shape + (d_w // 2,)),
    ], axis=-1).reshape(num_frames * height * width, head_dim // 2))
  return tuple(out)


def apply_rope(x, cos, sin):
  """x: [B, L, H, D]; cos, sin: [L, D/2] -> [B, L, H, D] in x.dtype, rotated in (at least) float32.

  Each pair (x1, x2) -> (x1 c - x2 s, x2 c + x1 s), written as pairs * c + swapped pairs * (-s, s): one
  elementwise pass. Stacking the two halves instead lowers to a concatenate along a size-2 minor axis, which
  XLA emitted as concatenate fusions of their own in the Wan TF step (four a layer, 29 ms of a 3 s step).
  """
  acc = jnp.promote_types(x.dtype, jnp.float32)
  b, length, h, d = x.shape
  pairs = x.astype(acc).reshape(b, length, h, d // 2, 2)
  c = cos.astype(acc)[None, :, None, :, None]
  s = sin.astype(acc)[None, :, None, :, None] * jnp.asarray([-1.0, 1.0], acc)
  out = pairs * c + jnp.flip(pairs, axis=-1) * s
  return out.reshape(b, length, h, d).astype(x.dtype)
