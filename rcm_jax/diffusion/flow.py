"""Rectified-flow (RF) and TrigFlow math: interpolants, targets, time samplers and shifts, loss weights.

Math only, no networks. Conventions (../shared/reference/causal_rcm.md section 2):
  x_t = (1 - t) x0 + t eps,  v = eps - x0,  x0_hat = x_t - t v,  t in [0, 1], t = 1 is pure noise.
Times are per latent frame, `t: [B, T]`, and broadcast over the frame's pixels/channels.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def bcast(t, x):
  """t: [B, T] (or [B]) -> broadcastable against x: [B, T, H, W, C]."""
  t = jnp.asarray(t, jnp.float32)
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x0, eps, t):
  """x_t = (1 - t) x0 + t eps; x0, eps: [B, T, H, W, C], t: [B, T]."""
  tb = bcast(t, x0)
  return (1.0 - tb) * x0 + tb * eps


def velocity_target(x0, eps):
  return eps - x0


def x0_from_velocity(x_t, t, v):
  return x_t - bcast(t, x_t) * v


def eps_from_velocity(x_t, t, v):
  return x_t + (1.0 - bcast(t, x_t)) * v


def shift(u, s):
  """The time shift `s u / (1 + (s - 1) u)`: pushes times towards noise for s > 1."""
  return s * u / (1.0 + (s - 1.0) * u)


# ----------------------------------------------------------------------------- time samplers
def uniform_shift(rng, shape, *, shift_s: float = 5.0, t_min: float = 0.0, t_max: float = 1.0):
  u = jax.random.uniform(rng, shape, jnp.float32, t_min, t_max)
  return shift(u, shift_s)


def logit_normal(rng, shape, *, mean: float = -0.8, std: float = 1.6):
  """sigma = exp(mean + std n), t = sigma / (1 + sigma)."""
  n = jax.random.normal(rng, shape, jnp.float32)
  return jax.nn.sigmoid(mean + std * n)


TIME_SAMPLERS: dict[str, Callable] = {"uniform_shift": uniform_shift, "logit_normal": logit_normal}


def time_sampler(name: str, **kwargs) -> Callable:
  """`time_sampler('uniform_shift', shift_s=5)(rng, shape)`; kwargs come from config."""
  if name not in TIME_SAMPLERS:
    raise ValueError(f"Unknown time sampler {name!r} (config key diffusion.time_sampler); "
                     f"choose one of {sorted(TIME_SAMPLERS)}.")
  return lambda rng, shape: TIME_SAMPLERS[name](rng, shape, **kwargs)


def tf_weight(t):
  """Gaussian-bell loss weight of TF diffusion: exp(-2 (t - 0.5)^2) - exp(-0.5)."""
  return jnp.exp(-2.0 * (t - 0.5) ** 2) - jnp.exp(-0.5)


# ----------------------------------------------------------------------------- TrigFlow (rCM)
def trigflow_from_rf_coeffs(s):
  """TrigFlow time s (x_s = cos s x0 + sin s eps) on an RF network.

  Returns (c_in, c_skip, c_out, t_rf) with x_rf = c_in x_s at RF time t_rf = sin / (cos + sin), and
  F(x_s, s) = c_skip x_s + c_out v_rf.
  """
  c, sn = jnp.cos(s), jnp.sin(s)
  c_in = 1.0 / (c + sn)
  return c_in, c_in, -sn / (c + sn), sn / (c + sn)


def trigflow_time(t_rf):
  """RF time -> TrigFlow time s = arctan(t / (1 - t)) (sigma = t / (1 - t) in both); inverse of rf_time."""
  t_rf = jnp.asarray(t_rf, jnp.float32)
  return jnp.arctan2(t_rf, 1.0 - t_rf)


def rf_time(s):
  """TrigFlow time s in [0, pi/2] -> RF time sin s / (cos s + sin s)."""
  return trigflow_from_rf_coeffs(s)[3]


def trigflow_velocity_from_rf(x_s, s, v_rf):
  """TrigFlow velocity F = dx_s/ds = cos s eps_hat - sin s x0_hat of an RF velocity `v_rf` evaluated at
  (c_in x_s, rf_time(s)); x_s: [B, T, H, W, C], s: [B, T]. Equals ((cos - sin) x_s + v_rf) / (cos + sin)."""
  c, sn = jnp.cos(bcast(s, x_s)), jnp.sin(bcast(s, x_s))
  return ((c - sn) * x_s + v_rf) / (c + sn)


def trigflow_interpolate(x0, eps, s):
  """x_s = cos s x0 + sin s eps."""
  sb = bcast(s, x0)
  return jnp.cos(sb) * x0 + jnp.sin(sb) * eps


# ----------------------------------------------------------------------------- dCM grid (TF-dCM)
def dcm_times(u, k, *, num_steps: int = 48, shift_s: float = 3.0):
  """Time t_k = shift(1 - u - k / num_steps, shift_s) of the shifted dCM grid; u ~ U(0, 1 - 1/num_steps).

  k = 0 gives the start time t0 of the teacher's Euler step, k = 1 its end t1 < t0.
  """
  return shift(1.0 - u - k / num_steps, shift_s)


def dcm_u(rng, shape, *, num_steps: int = 48):
  """u ~ U(0, 1 - 1/num_steps): both grid points t0 and t1 stay in [0, 1]."""
  return jax.random.uniform(rng, shape, jnp.float32, 0.0, 1.0 - 1.0 / num_steps)


def uniform(rng, shape, *, t_min: float = 0.0, t_max: float = 1.0):
  return jax.random.uniform(rng, shape, jnp.float32, t_min, t_max)


TIME_SAMPLERS["uniform"] = uniform
