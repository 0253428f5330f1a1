"""The train state: one pytree holding everything a resumed run needs (and nothing it can recompute).

Teacher params are not part of it: they are loaded from the stage that produced them.
Recipes with more networks (SF-DMD's fake-score critic) keep theirs under `extra`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
  step: jnp.ndarray          # int32 [], updates attempted so far (skipped NaN updates included)
  params: Any                # fp32 master params of the trained network
  opt_state: Any
  ema: Any                   # EMA params (same tree as params) or None
  nan_streak: jnp.ndarray    # int32 [], consecutive skipped (non-finite) updates
  nan_total: jnp.ndarray     # int32 [], all skipped updates
  extra: Any = None          # recipe-owned states (critic params, its optimizer, ...)

  @classmethod
  def create(cls, params, tx, *, use_ema: bool, extra=None):
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               ema=jax.tree.map(jnp.copy, params) if use_ema else None, nan_streak=jnp.zeros((), jnp.int32),
               nan_total=jnp.zeros((), jnp.int32), extra=extra)
