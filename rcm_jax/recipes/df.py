"""DF diffusion (diffusion forcing): rectified flow under the block-causal mask, an independent time per block.

No packing: the student sees x_t alone, block i attending to blocks <= i. Times per block from the `tf`
section's sampler (default UniformShift(5)); no loss weight (Causal-rCM section 4);
loss = mean_b sum_frames mean((v - (eps - x0))^2). CFG dropout from diffusion.p_uncond.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rcm_jax.diffusion import flow
from rcm_jax.recipes import causal
from rcm_jax.recipes.base import drop_conditions, register
from rcm_jax.recipes.tf import tf_section


@register("df")
class DiffusionForcing(causal.CausalRecipe):

  def __init__(self, config, model, **kw):
    super().__init__(config, model, **kw)
    c = tf_section(config)
    self.sample_t = flow.time_sampler(c.time_sampler, **c.time_sampler_kwargs)

  def loss(self, params, frozen, batch, rng, step):
    x0 = causal.as_f32(batch)                                      # [B, T, H, W, C]
    lay = self.layout(x0)
    r_t, r_eps, r_drop = jax.random.split(rng, 3)
    t = causal.block_times(self.sample_t, r_t, x0.shape[0], lay.block_ids())   # [B, T]
    eps = jax.random.normal(r_eps, x0.shape, jnp.float32)
    cond = drop_conditions(batch["cond"], batch["null"], r_drop, self.config.diffusion.p_uncond)
    v = causal.causal_velocity(self.model, params, lay, flow.interpolate(x0, eps, t), t, cond)
    sq = (v - flow.velocity_target(x0, eps)) ** 2
    loss = jnp.mean(causal.frame_sum_mean(sq))
    return loss, {"loss": loss, "t_mean": jnp.mean(t), "mse": jnp.mean(sq)}
