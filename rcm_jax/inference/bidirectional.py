"""Sampling from a bidirectional model: Euler ODE with classifier-free guidance, all frames at once.

Causal students stream chunk by chunk through the KV-cache rollout (a later module); the teacher and
its evaluation use this.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from rcm_jax.diffusion import samplers


@partial(jax.jit, static_argnames=("model", "num_steps", "cfg_scale", "shift"))
def sample(model, params, noise, cond: dict, null: dict, *, num_steps: int, cfg_scale: float,
           shift: float = 1.0):
  """noise: [B, T, H, W, C] -> x0 samples [B, T, H, W, C]; NFE = num_steps (x2 with cfg_scale != 1)."""
  b = noise.shape[0]
  guide = cfg_scale != 1.0

  def velocity(x, t):
    if not guide:
      return model.apply(params, x, t, **cond)
    both = {k: jnp.concatenate([cond[k], null[k]]) for k in cond}   # one pass for cond + uncond
    v = model.apply(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), **both)
    return samplers.cfg(v[:b], v[b:], cfg_scale)

  return samplers.euler(velocity, noise, samplers.time_grid(num_steps, shift_s=shift))
