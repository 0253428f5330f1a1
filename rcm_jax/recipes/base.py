"""The recipe interface and registry.

A recipe owns one objective: which params it trains, which frozen networks it reads (teachers), and a
pure `loss(params, frozen, batch, rng, step) -> (loss, metrics)`. `frozen` is a pytree of params the
trainer passes into the jitted step as an argument (never baked in as constants) and never updates.
Batches are dicts of arrays:
  video: [B, T, H, W, C] clean latents in [-1, 1]
  cond:  the model's conditioning kwargs (labels / actions / y), from the world
  null:  the same keys, unconditional (for CFG dropout and guidance)
Everything else (optimizer, EMA, NaN guard, checkpoints, the loop) is the trainer's.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from rcm_jax.errors import UserError

RECIPES: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
  def deco(cls):
    if name in RECIPES:
      raise ValueError(f"Recipe {name!r} registered twice.")
    cls.name = name
    RECIPES[name] = cls
    return cls
  return deco


def get_recipe(name: str) -> type:
  if name not in RECIPES:
    raise UserError(f"Unknown recipe {name!r} (config key recipe); choose one of {sorted(RECIPES)}.")
  return RECIPES[name]


def drop_conditions(cond: dict, null: dict, rng, p_uncond: float) -> dict:
  """Per sample, replace the conditions by the null ones with probability p_uncond (CFG training)."""
  if p_uncond <= 0.0 or not cond:
    return cond
  b = jax.tree.leaves(cond)[0].shape[0]
  drop = jax.random.uniform(rng, (b,)) < p_uncond

  def mix(c, n):
    d = drop.reshape((b,) + (1,) * (c.ndim - 1))
    return jnp.where(d, n, c)

  return {k: mix(cond[k], null[k]) for k in cond}


class Recipe:
  """Base recipe: one network (`model`, a flax Module) trained from `config`."""
  name = "base"

  def __init__(self, config, model):
    self.config = config
    self.model = model

  def init_params(self, rng, batch):
    x = batch["video"]
    t = jnp.zeros(x.shape[:2], jnp.float32)
    return self.model.init(rng, x, t, **batch["cond"])

  def frozen_params(self):
    """Pytree of frozen params (e.g. {"teacher": ...}) the loss reads; loaded in __init__ from config."""
    return {}

  def velocity(self, params, x, t, cond, **kwargs):
    """v_theta(x, t | cond): x [B, T, H, W, C], t [B, T] -> [B, T, H, W, C] fp32."""
    return self.model.apply(params, x, t, **cond, **kwargs)

  def loss(self, params, frozen, batch, rng, step):
    raise NotImplementedError
