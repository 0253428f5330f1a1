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


# ----------------------------------------------------------------------------- causal few-step schedules
# Causal-rCM section 6: every chunk starts at x = eps * T0; the few-step schedules below (1/2-step runs do 4 steps
# on the first chunk, which has no context to lean on).
T0 = 1600.0 / 1601.0
FOUR_STEP = (T0, 15.0 / 16.0, 5.0 / 6.0, 5.0 / 8.0, 0.0)
FEW_STEP_LATER_CHUNKS = {4: FOUR_STEP, 2: (T0, 5.0 / 6.0, 0.0), 1: (T0, 0.0)}


def few_step_times(num_steps: int, *, first_chunk: bool, first_chunk_steps: int = 4) -> tuple[float, ...]:
  """The paper's distilled-student times [num_steps + 1] for one chunk (num_steps in 1, 2, 4). The first chunk
  takes `first_chunk_steps` steps (the paper's 4: it has no context to lean on; 1 or 2 trade its quality for
  first-chunk latency)."""
  for key, n in (("eval.steps", num_steps), ("sample.first_chunk_steps", first_chunk_steps)):
    if n not in FEW_STEP_LATER_CHUNKS:
      raise ValueError(f"few-step schedules exist for 1, 2 and 4 steps, got {n} (config key {key}); "
                       "use the 'euler' solver for other step counts.")
  return FEW_STEP_LATER_CHUNKS[first_chunk_steps] if first_chunk else FEW_STEP_LATER_CHUNKS[num_steps]


def euler_step(x, t, t_next, v):
  """One Euler step of dx/dt = v from t to t_next (per-frame times [B, T] or scalars)."""
  return x + flow.bcast(jnp.asarray(t_next) - jnp.asarray(t), x) * v


def consistency_step(x, t, t_next, v, eps):
  """Few-step sampler step: x0_hat = x - t v, re-noised to t_next with fresh noise eps."""
  return flow.interpolate(flow.x0_from_velocity(x, t, v), eps, t_next)


def euler_knots(velocity_fn: Callable, x, knots, substeps: int):
  """Euler ODE from knots[0] to knots[-1], `substeps` uniform steps between consecutive knots.

  x: [B, T, H, W, C] at time knots[0] (shared by frames). Returns the states at every knot, [K, B, T, H, W, C]
  (index 0 is x itself): ODE pairs (x_{knot_k}, x_{knot_-1}) for knowledge distillation.
  """
  if substeps < 1:
    raise ValueError(f"substeps must be >= 1, got {substeps} (config key kd.substeps).")
  knots = jnp.asarray(knots, jnp.float32)
  b, nf = x.shape[:2]
  frac = jnp.arange(substeps + 1, dtype=jnp.float32) / substeps

  def interval(x, ab):
    a, c = ab
    ts = a + (c - a) * frac

    def step(x, tt):
      t, t_next = tt
      v = velocity_fn(x, jnp.full((b, nf), t, jnp.float32))
      return euler_step(x, t, t_next, v), None

    x, _ = jax.lax.scan(step, x, (ts[:-1], ts[1:]))
    return x, x

  _, states = jax.lax.scan(interval, x, (knots[:-1], knots[1:]))
  return jnp.concatenate([x[None], states])
