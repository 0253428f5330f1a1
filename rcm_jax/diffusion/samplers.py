"""ODE samplers for RF models: time grids, classifier-free guidance and the Euler solver.

A `velocity_fn(x, t) -> v` closes over params and conditions; samplers never see a network.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from rcm_jax.diffusion import flow


def time_grid(num_steps: int, *, shift_s: float = 1.0, t_max: float = 1.0) -> jnp.ndarray:
  """Decreasing times [num_steps + 1] from t_max to 0 on the shifted uniform grid."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps} (config key sample.steps).")
  u = jnp.linspace(t_max, 0.0, num_steps + 1, dtype=jnp.float32)
  return flow.shift(u, shift_s)


def cfg(v_cond, v_uncond, scale: float):
  """Classifier-free guidance in velocity space: v_u + s (v_c - v_u)."""
  return v_uncond + scale * (v_cond - v_uncond)


def guided(velocity_cond: Callable, velocity_uncond: Callable | None, scale: float) -> Callable:
  """One velocity_fn from a conditional and an unconditional one (scale 1 or no uncond: no CFG)."""
  if velocity_uncond is None or scale == 1.0:
    return velocity_cond
  return lambda x, t: cfg(velocity_cond(x, t), velocity_uncond(x, t), scale)


def euler(velocity_fn: Callable, noise, times):
  """Integrate dx/dt = v from times[0] to times[-1] with Euler steps; noise: [B, T, H, W, C].

  Shared time for all frames (bidirectional sampling). NFE = len(times) - 1 (x2 with CFG).
  """
  b, nf = noise.shape[:2]
  x = noise * times[0]  # the paper starts at eps * t0 (t0 = 1 gives pure noise)

  def body(x, tt):
    t, t_next = tt
    v = velocity_fn(x, jnp.full((b, nf), t, jnp.float32))
    return x + (t_next - t) * v, None

  x, _ = jax.lax.scan(body, x, (times[:-1], times[1:]))
  return x
