"""sCM in TrigFlow form on the bidirectional model: the rCM consistency objective, for comparison with TF-sCM.

TrigFlow: x_s = cos s x0 + sin s eps, s = arctan(sigma), sigma = exp(scm.time_mean + scm.time_std n). The
RF network is wrapped as a TrigFlow velocity F(x_s, s) = cos s eps_hat - sin s x0_hat of v_rf evaluated at
(x_s / (cos s + sin s), sin s / (cos s + sin s)) (flow.trigflow_velocity_from_rf). Teacher dx_s/ds =
F_teacher (bidirectional, CFG teacher.cfg_scale). One `jax.jvp` of the stop-gradient F along
(cos s sin s dx_s/ds, cos s sin s) gives cos s sin s dF/ds;
g = -cos^2 s (F_sg - dx_s/ds) - r (cos s sin s x_s + cos s sin s dF/ds), r the tangent warm-up;
loss = 100 ||F - sg(F) - g / (||g|| + 0.1)||^2, NaN samples zeroed (cm.py). No mask, shared time per sample.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rcm_jax.diffusion import flow
from rcm_jax.recipes import cm
from rcm_jax.recipes.base import Recipe, register
from rcm_jax.recipes.causal import RecipeConfigError, load_frozen, section
from rcm_jax.recipes.tf_scm import MAX_XLA_TOKENS, check_jvp_attention


def trigflow_velocity(model, params, x_s, s, cond):
  """F(x_s, s) of an RF network: x_s [B, T, H, W, C], s [B, T] -> [B, T, H, W, C]."""
  c_in, _, _, t_rf = flow.trigflow_from_rf_coeffs(s)
  v_rf = model.apply(params, flow.bcast(c_in, x_s) * x_s, t_rf, **cond)
  return flow.trigflow_velocity_from_rf(x_s, s, v_rf)


@register("scm_trigflow")
class TrigFlowSCM(Recipe):

  def __init__(self, config, model, *, teacher_params=None):
    super().__init__(config, model)
    self.cfg = cm.scm_section(config, "scm", max_xla_tokens=MAX_XLA_TOKENS)
    t = section(config, "teacher", kind="", cfg_scale=3.0, use_ema=True)
    if t.kind not in ("", "bidirectional"):
      raise RecipeConfigError(f"scm_trigflow distils a bidirectional teacher; teacher.kind={t.kind!r} must be "
                              "'bidirectional' or ''.")
    if not 1.0 <= float(t.cfg_scale) <= 20.0:
      raise RecipeConfigError(f"teacher.cfg_scale={t.cfg_scale} is out of range: use 1 (no guidance) to 20.")
    self.cfg_scale = float(t.cfg_scale)
    check_jvp_attention(model, 0, self.cfg.max_xla_tokens, "scm")
    self._teacher = teacher_params if teacher_params is not None else load_frozen(
        config, model, "teacher_from", use_ema=t.use_ema, kind="bidirectional")

  def frozen_params(self):
    return {"teacher": self._teacher}

  def times(self, rng, b: int, nf: int):
    sigma = jnp.exp(self.cfg.time_mean + self.cfg.time_std * jax.random.normal(rng, (b, 1), jnp.float32))
    return jnp.broadcast_to(jnp.arctan(sigma), (b, nf))

  def loss(self, params, frozen, batch, rng, step):
    x0 = jnp.asarray(batch["video"], jnp.float32)                 # [B, T, H, W, C]
    b, nf = x0.shape[:2]
    r_t, r_eps = jax.random.split(rng)
    s = self.times(r_t, b, nf)                                     # [B, T] TrigFlow time
    eps = jax.random.normal(r_eps, x0.shape, jnp.float32)
    x_s = flow.trigflow_interpolate(x0, eps, s)
    cond, null = batch["cond"], batch["null"]
    f_c = trigflow_velocity(self.model, frozen["teacher"], x_s, s, cond)
    if self.cfg_scale != 1.0:
      f_c = f_c + (self.cfg_scale - 1.0) * (f_c - trigflow_velocity(self.model, frozen["teacher"], x_s, s, null))
    dxds = jax.lax.stop_gradient(f_c)
    params_sg = jax.lax.stop_gradient(params)
    cs = jnp.cos(s) * jnp.sin(s)                                   # [B, T]
    csb = flow.bcast(cs, x0)
    f_sg, cs_df = jax.jvp(lambda x, ss: trigflow_velocity(self.model, params_sg, x, ss, cond), (x_s, s),
                          (csb * dxds, cs))
    r = cm.warmup_ratio(step, self.cfg.warmup_steps)
    g = -flow.bcast(jnp.cos(s) ** 2, x0) * (f_sg - dxds) - r * (csb * x_s + cs_df)
    f = trigflow_velocity(self.model, params, x_s, s, cond)
    loss, metrics = cm.tangent_loss(f, g, norm_eps=self.cfg.norm_eps, loss_scale=self.cfg.loss_scale)
    return loss, dict(metrics, s_mean=jnp.mean(s), warmup_r=r)
