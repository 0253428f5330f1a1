"""Rectified-flow diffusion of the bidirectional teacher: v-prediction with CFG dropout.

One time per sample shared by all frames (bidirectional model, no mask), t from the configured sampler,
loss = mean over everything of (v_theta(x_t, t) - (eps - x0))^2, in fp32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rcm_jax.diffusion import flow
from rcm_jax.recipes.base import Recipe, drop_conditions, register


@register("rf")
class RectifiedFlow(Recipe):

  def __init__(self, config, model):
    super().__init__(config, model)
    d = config.diffusion
    self.sample_t = flow.time_sampler(d.time_sampler, **d.time_sampler_kwargs)

  def loss(self, params, frozen, batch, rng, step):
    x0 = batch["video"].astype(jnp.float32)                       # [B, T, H, W, C]
    b, nf = x0.shape[:2]
    r_t, r_eps, r_drop = jax.random.split(rng, 3)
    t = jnp.broadcast_to(self.sample_t(r_t, (b, 1)), (b, nf))     # [B, T], shared by frames
    eps = jax.random.normal(r_eps, x0.shape, jnp.float32)
    cond = drop_conditions(batch["cond"], batch["null"], r_drop, self.config.diffusion.p_uncond)
    v = self.velocity(params, flow.interpolate(x0, eps, t), t, cond)
    per_sample = jnp.mean((v - flow.velocity_target(x0, eps)) ** 2, axis=(1, 2, 3, 4))
    loss = jnp.mean(per_sample)
    return loss, {"loss": loss, "t_mean": jnp.mean(t)}
