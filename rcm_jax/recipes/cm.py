"""Continuous-time consistency (sCM / MeanFlow) pieces shared by tf_scm, tf_meanflow and scm_trigflow.

All of them train with the "tangent" form of the loss (sCM, rCM): given a target direction g (a function of
the stop-gradient network and its JVP), the loss is `scale * ||F_theta - sg(F_theta) - g_hat||^2` with
`g_hat = g / (||g|| + norm_eps)` per sample. Its value is about `scale * ||g_hat||^2` and its gradient
`-2 scale g_hat . dF_theta/dtheta`: the network is pushed along g. `||g||` (metric `g_norm`, unnormalised)
is the consistency residual that falls as training converges; the loss value itself stays near `scale`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rcm_jax.recipes.causal import RecipeConfigError, section

SCM_DEFAULTS = dict(
    time_mean=-0.8,      # LogitNormal(mean, std) of the RF time (TrigFlow: s = arctan(sigma))
    time_std=1.6,
    warmup_steps=1000,   # tangent warm-up: r = min(1, step / warmup_steps)
    norm_eps=0.1,        # g <- g / (||g|| + norm_eps) per sample
    loss_scale=100.0,
)


def scm_section(config, name: str = "scm", **extra):
  c = section(config, name, **SCM_DEFAULTS, **extra)
  if c.warmup_steps < 0:
    raise RecipeConfigError(f"{name}.warmup_steps must be >= 0 (0 = no warm-up), got {c.warmup_steps}.")
  if c.norm_eps <= 0:
    raise RecipeConfigError(f"{name}.norm_eps must be > 0, got {c.norm_eps}.")
  if c.time_std <= 0:
    raise RecipeConfigError(f"{name}.time_std must be > 0, got {c.time_std}.")
  return c


def warmup_ratio(step, warmup_steps: int):
  """r = min(1, step / warmup_steps) in fp32 (1 when warmup_steps == 0)."""
  if warmup_steps == 0:
    return jnp.float32(1.0)
  return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)


def normalize_per_sample(g, norm_eps: float):
  """g: [B, ...] -> (g / (||g|| + eps) with non-finite samples zeroed, ||g|| [B], finite [B] bool)."""
  axes = tuple(range(1, g.ndim))
  norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=axes))
  finite = jnp.isfinite(norm)
  shape = (-1,) + (1,) * (g.ndim - 1)
  g_hat = jnp.where(finite.reshape(shape), g / (jnp.where(finite, norm, 1.0) + norm_eps).reshape(shape), 0.0)
  return g_hat, norm, finite


def tangent_loss(f_theta, g, *, norm_eps: float, loss_scale: float):
  """scale * mean_b ||f_theta - sg(f_theta) - g_hat||^2 and its metrics; f_theta, g: [B, ...] fp32."""
  g_hat, g_norm, finite = normalize_per_sample(jax.lax.stop_gradient(g), norm_eps)
  diff = f_theta - jax.lax.stop_gradient(f_theta) - g_hat
  per_sample = jnp.sum(jnp.square(diff), axis=tuple(range(1, diff.ndim)))
  loss = loss_scale * jnp.mean(per_sample)
  n_ok = jnp.maximum(jnp.sum(finite), 1)
  metrics = {"loss": loss, "g_norm": jnp.sum(jnp.where(finite, g_norm, 0.0)) / n_ok,
             "nan_samples": jnp.sum(~finite).astype(jnp.float32)}
  return loss, metrics
