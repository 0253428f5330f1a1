"""TF-KD: ODE-pair regression under teacher forcing (the CausVid / Self-Forcing "ODE init").

Pairs are generated on the fly inside the step by the frozen teacher (default: the bidirectional rf
teacher, CFG teacher.cfg_scale): from x = eps * knots[0] an Euler ODE runs through `kd.knots` (default the
4-step schedule [1600/1601, 15/16, 5/6, 5/8, 0]) with `kd.substeps` Euler steps per interval, recording the
state at every knot. The student then sees `[x0_ode | x_{knot_k}]` (each block at its own random knot k <
last) under the teacher-forcing mask and regresses its x0 prediction x - t v onto the ODE endpoint x0_ode:
loss = kd.loss_scale * mean_b sum_frames mean((x0_hat - x0_ode)^2).
Why on the fly rather than stored pairs: no extra data job or disk, fresh noise every step, and the cost
(2 * substeps * (len(knots) - 1) teacher passes per step) is small at toy scale; at Wan scale pairs would come
from the `generate` job instead. The batch's video is not used (only its conditions and shape).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rcm_jax.diffusion import flow, samplers
from rcm_jax.recipes import causal
from rcm_jax.recipes.base import register

KD_DEFAULTS = dict(knots=samplers.FOUR_STEP, substeps=8, loss_scale=1.0)


@register("tf_kd")
class TeacherForcingKD(causal.CausalRecipe):
  default_teacher_kind = "bidirectional"

  def __init__(self, config, model, **kw):
    super().__init__(config, model, **kw)
    self.cfg = causal.section(config, "kd", **KD_DEFAULTS)
    knots = tuple(float(k) for k in self.cfg.knots)
    if len(knots) < 2 or knots[-1] != 0.0 or any(a <= b for a, b in zip(knots, knots[1:])) or knots[0] > 1.0:
      raise causal.RecipeConfigError(f"kd.knots={knots}: need strictly decreasing times in (0, 1] ending at 0.")
    if self.cfg.substeps < 1:
      raise causal.RecipeConfigError(f"kd.substeps must be >= 1, got {self.cfg.substeps}.")
    if self.teacher.kind != "bidirectional":
      raise causal.RecipeConfigError("tf_kd integrates the teacher's ODE over the whole video, which needs a "
                                     "bidirectional teacher: set teacher.kind='bidirectional' (an rf stage).")
    self.knots = knots

  def ode_pairs(self, frozen, lay, batch, eps):
    """States of the teacher's guided Euler ODE at every knot: [K, B, T, H, W, C] (last = x0_ode).

    The teacher is bidirectional (checked in __init__), so it sees x alone; x is passed as the unused context.
    """
    vel = lambda x, t: self.teacher_velocity(frozen, lay, x, x, t, batch)
    return samplers.euler_knots(vel, eps * self.knots[0], self.knots, int(self.cfg.substeps))

  def loss(self, params, frozen, batch, rng, step):
    shape = jnp.shape(batch["video"])
    b, nf = shape[:2]
    lay = causal.layout(self.pattern, self.model, jax.ShapeDtypeStruct(shape, jnp.float32))
    r_eps, r_k = jax.random.split(rng)
    eps = jax.random.normal(r_eps, shape, jnp.float32)
    states = jax.lax.stop_gradient(self.ode_pairs(frozen, lay, batch, eps))   # [K, B, T, H, W, C]
    x0_ode = states[-1]
    ids = lay.block_ids()
    k = jax.random.randint(r_k, (b, int(ids.max()) + 1), 0, len(self.knots) - 1)[:, ids]   # [B, T]
    x_in = jnp.take_along_axis(states, k[None, :, :, None, None, None], axis=0)[0]
    t = jnp.asarray(self.knots, jnp.float32)[k]
    v = causal.tf_velocity(self.model, params, lay, x0_ode, x_in, t, batch["cond"])
    sq = (flow.x0_from_velocity(x_in, t, v) - x0_ode) ** 2
    loss = self.cfg.loss_scale * jnp.mean(causal.frame_sum_mean(sq))
    return loss, {"loss": loss, "t_mean": jnp.mean(t)}
