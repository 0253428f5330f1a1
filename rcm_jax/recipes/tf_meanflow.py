"""TF-MeanFlow: average-velocity model u(z, r, t) under teacher forcing, trained with the MeanFlow JVP target.

u(z, r, t) is the mean velocity over [r, t]: z_r = z_t - (t - r) u. MeanFlow identity: u = v - (t - r) du/dt,
du/dt the total derivative along the ODE (tangent (dz, dr, dt) = (v, 0, 1)). Here v = the frozen causal
teacher's guided velocity (meanflow.velocity = "teacher", distillation as in TF-sCM) or the data velocity
eps - x0 ("data", no teacher). Like TF-sCM, g = (v - u_sg) - r_w (t - r) du/dt with warm-up r_w, normalised
per sample, loss = 100 ||u - sg(u) - g_hat||^2 (cm.py). At r = 0 this is TF-sCM's target exactly.

The second time input, without touching the model's layers: the model's own time embedder E (per frame)
is reused, temb = E(1000 t) + E(1000 (t - r)) - E(0), injected by a flax method interceptor on
`WanConditionEmbedder.embed_time`. No new params, the param tree is the TF checkpoint's, and at r = t the
network is exactly the instantaneous-velocity model v(z, t): a TF / TF-sCM checkpoint initialises it, and
sampling uses u(z, 0, t) (an x0 prediction z - t u; causal sampler `average_velocity=True`, config key
eval.average_velocity). The clean half has t = r = 0, so it is unchanged. `mean_flow_apply` lives in
inference/causal_sample.py because the sampler needs it too.
Times: t, r from LogitNormal(scm.time_mean, scm.time_std) sorted so r <= t, shared by frames; with
probability 1 - meanflow.p_interval, r = t (the MeanFlow paper's 25 % r != t is the default).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rcm_jax.diffusion import flow
from rcm_jax.inference.causal_sample import mean_flow_apply
from rcm_jax.recipes import causal, cm
from rcm_jax.recipes.base import register
from rcm_jax.recipes.tf_scm import MAX_XLA_TOKENS, check_jvp_attention, jvp_batch

VELOCITIES = ("teacher", "data")


@register("tf_meanflow")
class TeacherForcingMeanFlow(causal.CausalRecipe):
  default_teacher_kind = "causal"

  def __init__(self, config, model, **kw):
    self.mf = causal.section(config, "meanflow", velocity="teacher", p_interval=0.25)
    if self.mf.velocity not in VELOCITIES:
      raise causal.RecipeConfigError(f"meanflow.velocity={self.mf.velocity!r}: choose one of {VELOCITIES}.")
    if not 0.0 <= self.mf.p_interval <= 1.0:
      raise causal.RecipeConfigError(f"meanflow.p_interval must be in [0, 1], got {self.mf.p_interval}.")
    super().__init__(config, model, **kw)
    self.cfg = cm.scm_section(config, "scm", max_xla_tokens=MAX_XLA_TOKENS)
    self.sample_t = flow.time_sampler("logit_normal", mean=self.cfg.time_mean, std=self.cfg.time_std)
    check_jvp_attention(model, 0, self.cfg.max_xla_tokens, "scm")

  def uses_teacher(self) -> bool:
    return self.mf.velocity == "teacher"

  def average_velocity(self, params, lay, x_packed, t_packed, r_packed, cond):
    """u on the packed [clean | noisy] sequence: [B, 2T, H, W, C]."""
    return mean_flow_apply(self.model, params, x_packed, t_packed, r_packed, **causal.pack_cond(cond),
                           mask=lay.tf_mask(), frame_positions=lay.tf_positions())

  def times(self, rng, b: int, nf: int):
    r1, r2, r3 = jax.random.split(rng, 3)
    a, c = self.sample_t(r1, (b, 1)), self.sample_t(r2, (b, 1))
    t, r = jnp.maximum(a, c), jnp.minimum(a, c)
    r = jnp.where(jax.random.uniform(r3, (b, 1)) < self.mf.p_interval, r, t)
    return jnp.broadcast_to(t, (b, nf)), jnp.broadcast_to(r, (b, nf))

  def loss(self, params, frozen, batch, rng, step):
    x0, b, nf, lay = jvp_batch(self, batch)                        # x0: [B, T, H, W, C]
    r_t, r_eps = jax.random.split(rng)
    t, r = self.times(r_t, b, nf)                                  # [B, T] each, r <= t
    eps = jax.random.normal(r_eps, x0.shape, jnp.float32)
    x_t = flow.interpolate(x0, eps, t)
    cond = batch["cond"]
    if self.uses_teacher():
      v = self.teacher_velocity(frozen, lay, x0, x_t, t, batch)
    else:
      v = flow.velocity_target(x0, eps)
    zeros = jnp.zeros_like(t)
    params_sg = jax.lax.stop_gradient(params)
    fn = lambda xp, tp, rp: self.average_velocity(params_sg, lay, xp, tp, rp, cond)
    primals = (causal.pack(x0, x_t), causal.pack(zeros, t), causal.pack(zeros, r))
    tangents = (causal.pack(jnp.zeros_like(x0), v), causal.pack(zeros, jnp.ones_like(t)), jnp.zeros_like(primals[2]))
    u_sg, du = (causal.unpack_noisy(o, nf) for o in jax.jvp(fn, primals, tangents))
    w = cm.warmup_ratio(step, self.cfg.warmup_steps)
    g = (v - u_sg) - w * flow.bcast(t - r, du) * du
    u = causal.unpack_noisy(self.average_velocity(params, lay, primals[0], primals[1], primals[2], cond), nf)
    loss, metrics = cm.tangent_loss(u, g, norm_eps=self.cfg.norm_eps, loss_scale=self.cfg.loss_scale)
    return loss, dict(metrics, t_mean=jnp.mean(t), interval_mean=jnp.mean(t - r), warmup_r=w)
