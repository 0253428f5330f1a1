"""TF diffusion: teacher-forcing rectified flow of a causal student (Causal-rCM section 4, "TF diffusion").

The student sees `[clean x0 | noisy x_t]` under the teacher-forcing mask; one time per sample shared by all
frames, t ~ UniformShift(5); loss = mean_b sum_frames w(t) mean((v - (eps - x0))^2) on the noisy half only,
w(t) = exp(-2 (t - 0.5)^2) - exp(-0.5) (Gaussian bell). CFG dropout of the conditions (diffusion.p_uncond).
Config section `tf`:
  time_sampler, time_sampler_kwargs   default uniform_shift(shift_s=5)
  weight                               "bell" (paper) | "none"
  context_times                        () = clean context (paper). Noisy-context training: a tuple of times
                                       (e.g. the few-step schedule's last-step times (5/6, 5/8)); each block's
                                       context is re-noised to one of them (uniform pick, fresh noise), and
                                       the network is told that time. Matches "noisy context" inference.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rcm_jax.diffusion import flow
from rcm_jax.recipes import causal
from rcm_jax.recipes.base import drop_conditions, register

TF_DEFAULTS = dict(time_sampler="uniform_shift", time_sampler_kwargs=dict(shift_s=5.0), weight="bell",
                   context_times=())
WEIGHTS = ("bell", "none")


def tf_section(config):
  c = causal.section(config, "tf", **TF_DEFAULTS)
  if c.weight not in WEIGHTS:
    raise causal.RecipeConfigError(f"tf.weight={c.weight!r}: choose one of {WEIGHTS}.")
  if any(not 0.0 <= float(t) < 1.0 for t in c.context_times):
    raise causal.RecipeConfigError(f"tf.context_times={tuple(c.context_times)}: times must lie in [0, 1).")
  return c


@register("tf")
class TeacherForcing(causal.CausalRecipe):

  def __init__(self, config, model, **kw):
    super().__init__(config, model, **kw)
    self.cfg = tf_section(config)
    self.sample_t = flow.time_sampler(self.cfg.time_sampler, **self.cfg.time_sampler_kwargs)

  def context(self, x0, rng, lay):
    """Clean context (t_ctx = 0), or with tf.context_times each block re-noised to one of those times."""
    times = tuple(float(t) for t in self.cfg.context_times)
    if not times:
      return x0, jnp.zeros(x0.shape[:2], jnp.float32)
    r_pick, r_eps = jax.random.split(rng)
    ids = lay.block_ids()
    pick = jax.random.randint(r_pick, (x0.shape[0], int(ids.max()) + 1), 0, len(times))[:, ids]   # [B, T]
    t_ctx = jnp.asarray(times, jnp.float32)[pick]
    return flow.interpolate(x0, jax.random.normal(r_eps, x0.shape, jnp.float32), t_ctx), t_ctx

  def loss(self, params, frozen, batch, rng, step):
    x0 = causal.as_f32(batch)                                      # [B, T, H, W, C]
    b, nf = x0.shape[:2]
    lay = self.layout(x0)
    r_t, r_eps, r_drop, r_ctx = jax.random.split(rng, 4)
    t = causal.shared_times(self.sample_t, r_t, b, nf)             # [B, T]
    eps = jax.random.normal(r_eps, x0.shape, jnp.float32)
    cond = drop_conditions(batch["cond"], batch["null"], r_drop, self.config.diffusion.p_uncond)
    x_ctx, t_ctx = self.context(x0, r_ctx, lay)
    v = causal.tf_velocity(self.model, params, lay, x_ctx, flow.interpolate(x0, eps, t), t, cond, t_ctx)
    sq = (v - flow.velocity_target(x0, eps)) ** 2                  # noisy half only
    w = flow.tf_weight(t) if self.cfg.weight == "bell" else jnp.ones_like(t)
    per_sample = jnp.sum(w * jnp.mean(sq, axis=(2, 3, 4)), axis=1)
    loss = jnp.mean(per_sample)
    return loss, {"loss": loss, "t_mean": jnp.mean(t), "mse": jnp.mean(sq)}
