"""Optimizers from config: AdamW with a linear warm-up then constant learning rate.

Config keys (`config.optim`): lr, b1, b2, eps, weight_decay, warmup_steps, clip_norm (0 = none), mu_dtype
(Adam's first moment: float32, or bfloat16 for half its memory; the second moment stays float32).
The paper's stages use betas (0, 0.999) for distillation and (0.9, 0.999) for TF/DF; no clipping.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

MU_DTYPES = ("float32", "bfloat16")


def lr_schedule(lr: float, warmup_steps: int):
  if warmup_steps <= 0:
    return optax.constant_schedule(lr)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)], [warmup_steps])


def make_optimizer(optim_cfg, key: str = "optim") -> optax.GradientTransformation:
  """AdamW from the config section `key` (for error messages: optim, optim_critic)."""
  if optim_cfg.lr <= 0:
    raise ValueError(f"{key}.lr must be > 0, got {optim_cfg.lr}.")
  mu_dtype = optim_cfg.get("mu_dtype", "float32")
  if mu_dtype not in MU_DTYPES:
    raise ValueError(f"{key}.mu_dtype={mu_dtype!r}: choose one of {MU_DTYPES} (bfloat16 halves the memory of "
                     "Adam's first moment).")
  tx = optax.adamw(lr_schedule(optim_cfg.lr, optim_cfg.warmup_steps), b1=optim_cfg.b1, b2=optim_cfg.b2,
                   eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay, mu_dtype=jnp.dtype(mu_dtype))
  if optim_cfg.get("clip_norm", 0.0):
    tx = optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), tx)
  return tx
