"""Exponential moving averages of parameters: classic (fixed decay) and EDM2 power EMA.

Power EMA (Karras et al., EDM2): beta_t = (1 - 1/t)^(gamma + 1) at step t >= 1, so the average
weighs the recent past with a profile of relative width `std` (sigma_rel) independent of run length.
`config.ema`: kind in {"none", "classic", "power"}; decay (classic); std (power, e.g. 0.05).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

EMA_KINDS = ("none", "classic", "power")


def std_to_gamma(std: float) -> float:
  """Solve (g + 1) / ((g + 2)^2 (g + 3)) = std^2 for the power-EMA exponent g (the largest root)."""
  if not 0.0 < std < 0.3:
    raise ValueError(f"ema.std must be in (0, 0.3) for a power EMA, got {std}.")
  s2 = std * std
  # s2 (g+2)^2 (g+3) - (g+1) = 0 expanded: s2 g^3 + 7 s2 g^2 + (16 s2 - 1) g + (12 s2 - 1) = 0.
  roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
  return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def ema_decay(ema_cfg, step):
  """Decay applied when folding in the params after update number `step` (1-based), as a jnp scalar."""
  step = jnp.asarray(step, jnp.float32)
  if ema_cfg.kind == "classic":
    return jnp.asarray(ema_cfg.decay, jnp.float32)
  if ema_cfg.kind == "power":
    gamma = std_to_gamma(ema_cfg.std)
    return (1.0 - 1.0 / jnp.maximum(step, 1.0)) ** (gamma + 1.0)
  raise ValueError(f"Unknown ema.kind {ema_cfg.kind!r}; choose one of {EMA_KINDS}.")


def update(ema_params, params, decay):
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema_params, params)
