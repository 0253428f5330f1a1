"""TF-dCM: discrete-time consistency distillation of the causal teacher under teacher forcing.

u ~ U(0, 1 - 1/N), t_k = shift(1 - u - k/N, s) for k = 0, 1 (N = 48, s = 3), shared by frames. The frozen
causal teacher (CFG teacher.cfg_scale = 3, clean context x0) takes one Euler step x_{t0} -> x_{t1}. Target =
the student's own x0 prediction at (x_{t1}, t1) under stop-gradient (dcm.target = "student", the paper) or
from EMA params (dcm.target = "ema": the trainer must then pass its EMA params as frozen["ema"]).
loss = dcm.loss_scale * mean_b sum_frames mean((x0_hat(x_{t0}, t0) - target)^2), loss_scale 100.
The student is conditioned (no CFG dropout: distilled students sample without guidance).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rcm_jax.diffusion import flow, samplers
from rcm_jax.recipes import causal
from rcm_jax.recipes.base import register

DCM_DEFAULTS = dict(num_steps=48, shift=3.0, target="student", loss_scale=100.0)
TARGETS = ("student", "ema")


@register("tf_dcm")
class TeacherForcingDCM(causal.CausalRecipe):
  default_teacher_kind = "causal"

  def __init__(self, config, model, **kw):
    super().__init__(config, model, **kw)
    self.cfg = causal.section(config, "dcm", **DCM_DEFAULTS)
    if self.cfg.target not in TARGETS:
      raise causal.RecipeConfigError(f"dcm.target={self.cfg.target!r}: choose one of {TARGETS}.")
    if self.cfg.num_steps < 2:
      raise causal.RecipeConfigError(f"dcm.num_steps must be >= 2, got {self.cfg.num_steps}.")
    if self.cfg.shift <= 0:
      raise causal.RecipeConfigError(f"dcm.shift must be > 0, got {self.cfg.shift}.")
    self.needs_ema = self.cfg.target == "ema"

  def times(self, rng, b: int, nf: int):
    """(t0, t1): [B, T] each, t0 > t1, on the shifted grid."""
    u = flow.dcm_u(rng, (b, 1), num_steps=self.cfg.num_steps)
    t0, t1 = (jnp.broadcast_to(flow.dcm_times(u, k, num_steps=self.cfg.num_steps, shift_s=self.cfg.shift), (b, nf))
              for k in (0, 1))
    return t0, t1

  def loss(self, params, frozen, batch, rng, step):
    x0 = causal.as_f32(batch)                                      # [B, T, H, W, C]
    b, nf = x0.shape[:2]
    lay = self.layout(x0)
    r_t, r_eps = jax.random.split(rng)
    t0, t1 = self.times(r_t, b, nf)
    eps = jax.random.normal(r_eps, x0.shape, jnp.float32)
    x_t0 = flow.interpolate(x0, eps, t0)
    v_teacher = self.teacher_velocity(frozen, lay, x0, x_t0, t0, batch)
    x_t1 = samplers.euler_step(x_t0, t0, t1, v_teacher)
    if self.needs_ema:
      if "ema" not in frozen:
        raise causal.RecipeConfigError("dcm.target='ema' needs the trainer to pass EMA params as frozen['ema']; "
                                       "use dcm.target='student' (the paper's choice).")
      target_params = frozen["ema"]
    else:
      target_params = params
    target_params = jax.lax.stop_gradient(target_params)
    cond = batch["cond"]
    v1 = causal.tf_velocity(self.model, target_params, lay, x0, x_t1, t1, cond)
    target = jax.lax.stop_gradient(flow.x0_from_velocity(x_t1, t1, v1))
    v0 = causal.tf_velocity(self.model, params, lay, x0, x_t0, t0, cond)
    sq = (flow.x0_from_velocity(x_t0, t0, v0) - target) ** 2
    loss = self.cfg.loss_scale * jnp.mean(causal.frame_sum_mean(sq))
    return loss, {"loss": loss, "t_mean": jnp.mean(t0), "dt_mean": jnp.mean(t0 - t1)}
