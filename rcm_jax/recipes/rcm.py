"""rCM = sCM + lambda DMD in one student update: the joint causal mode (TF-sCM + lambda SF-DMD, Causal-rCM's
ablation) and the bidirectional rCM (TrigFlow sCM + lambda DMD, as rCM trains it).

Owns: the two recipes and the bidirectional few-step generator with an exit step (`bidirectional_generate`). The
losses are the existing ones, called, not re-implemented: the sCM term is `tf_scm.TeacherForcingSCM.loss` (joint)
or `scm_trigflow.TrigFlowSCM.loss` (bidirectional) on the data batch (teacher forcing for the causal student),
the DMD term is `sf_dmd.DistributionMatching.dmd_term` on the student's own generation, and the critic, its
optimizer, update ratio, NaN guard and the two-network update are sf_dmd's.

  loss = L_sCM(params; batch, r_scm) + rcm.dmd_weight * L_DMD(params; rollout, r_dmd),  (r_dmd, r_scm) = split(rng)

rcm_joint: the causal student (block pattern causal.*), DMD against the bidirectional teacher (teacher_from, CFG
teacher.cfg_scale) on the KV-cache rollout as sf_dmd; the TF-sCM term distils `scm_teacher_from` (a causal TF stage,
teacher forcing with clean context, as the tf_scm stage) or, when that is "", the same bidirectional teacher.
rcm_bidirectional: a bidirectional student; its generation runs the dmd.schedule few-step consistency sampler on
all frames at once (no mask, no cache), gradients only through the exit step, which cycles with the iteration.
The reference's lambda is 0.01 (rCM); Causal-rCM found the joint causal mode lowers the ceiling (stages apart).

Config keys: rcm.dmd_weight (lambda > 0), scm_teacher_from (rcm_joint), scm.*, dmd.*, optim_critic.*, teacher.*,
teacher_from, critic_from, causal.* (rcm_joint).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from rcm_jax.diffusion import flow, samplers
from rcm_jax.recipes.base import register
from rcm_jax.recipes.causal import RecipeConfigError, section
from rcm_jax.recipes.scm_trigflow import TrigFlowSCM
from rcm_jax.recipes.sf_dmd import (DMD_DEFAULTS, GENERATOR_KEYS, DistributionMatching, SelfForcingDMD,
                                    check_frozen_config, load_checked)
from rcm_jax.recipes.tf_scm import TeacherForcingSCM

RCM_DEFAULTS = dict(dmd_weight=0.01)


def rcm_section(config) -> ml_collections.ConfigDict:
  c = section(config, "rcm", **RCM_DEFAULTS)
  if not float(c.dmd_weight) > 0:
    raise RecipeConfigError(f"rcm.dmd_weight must be > 0 (lambda, the DMD term's weight; rCM: 0.01), got "
                            f"{c.dmd_weight!r}; for sCM alone use recipe tf_scm or scm_trigflow.")
  return c


def combine(scm, dmd, weight: float):
  """(L_sCM, metrics), (L_DMD, metrics) -> (L_sCM + weight L_DMD, both metrics with scm_loss, dmd_loss, loss)."""
  (l_scm, m_scm), (l_dmd, m_dmd) = scm, dmd
  loss = l_scm + weight * l_dmd
  return loss, {**m_scm, **m_dmd, "scm_loss": l_scm, "dmd_loss": l_dmd, "loss": loss}


def bidirectional_generate(model, params, noise, cond: dict, times, rng, exit_step, *, prefix_params=None):
  """Few-step consistency samples of a bidirectional model on all frames: noise [B, T, H, W, C] -> x0 [B, T, ...].

  times: static schedule (n_steps + 1, strictly decreasing to 0). Steps before `exit_step` (1..n_steps, may be
  traced) run on stop_gradient(prefix_params or params) and re-noise with the s-th split of rng; the exit
  step's call x0 = x - t v_params(x, t) keeps gradients and is the output.
  """
  sg = jax.lax.stop_gradient
  times = jnp.asarray(times, jnp.float32)
  n_steps = times.shape[0] - 1
  pre = sg(params if prefix_params is None else prefix_params)
  keys = jax.random.split(rng, n_steps)
  b, nf = noise.shape[:2]
  call = lambda p, x, t: model.apply(p, x, jnp.full((b, nf), t, jnp.float32), **cond)

  def body(s, x):
    eps = jax.random.normal(keys[s], x.shape, jnp.float32)
    return samplers.consistency_step(x, times[s], times[s + 1], call(pre, x, times[s]), eps)

  x = sg(jax.lax.fori_loop(0, exit_step - 1, body, sg(noise.astype(jnp.float32) * times[0])))
  t_exit = times[exit_step - 1]
  return flow.x0_from_velocity(x, t_exit, call(params, x, t_exit))


@register("rcm_joint")
class JointRCM(SelfForcingDMD):
  """TF-sCM + lambda SF-DMD on the causal student; the critic as in sf_dmd (state.extra)."""

  def __init__(self, config, model, *, teacher_params=None, critic_params=None, scm_teacher_params=None):
    super().__init__(config, model, teacher_params=teacher_params, critic_params=critic_params)
    self.dmd_weight = float(rcm_section(config).dmd_weight)
    causal_teacher = bool(config.get("scm_teacher_from")) or scm_teacher_params is not None
    self._scm_teacher = None
    if causal_teacher:   # a causal TF stage: teacher forcing with clean context, as the tf_scm stage
      self._scm_teacher = load_checked(config, model, "scm_teacher_from", "sCM teacher",
                                       use_ema=self.teacher.use_ema, kind="causal", params=scm_teacher_params)
    sub = ml_collections.ConfigDict(config.to_dict())
    sub.recipe = "tf_scm"
    sub.teacher = ml_collections.ConfigDict(dict(kind="causal" if causal_teacher else "bidirectional",
                                                 cfg_scale=self.teacher.cfg_scale, use_ema=self.teacher.use_ema))
    # the sCM term is tf_scm's own loss (its checks included); it never loads: the teacher is passed in
    self.scm = TeacherForcingSCM(sub, model, teacher_params=self._scm_teacher if causal_teacher
                                 else self._teacher_params)

  def frozen_params(self):
    frozen = super().frozen_params()
    if self._scm_teacher is not None:
      frozen["scm_teacher"] = self._scm_teacher
    return frozen

  def loss(self, params, frozen, batch, rng, step):
    """frozen = {"teacher", "critic"[, "scm_teacher"]}."""
    r_dmd, r_scm = jax.random.split(rng)
    scm_frozen = {"teacher": frozen.get("scm_teacher", frozen["teacher"])}
    return combine(self.scm.loss(params, scm_frozen, batch, r_scm, step),
                   self.dmd_term(params, frozen, batch, r_dmd, step), self.dmd_weight)


@register("rcm_bidirectional")
class BidirectionalRCM(DistributionMatching, TrigFlowSCM):
  """rCM on the bidirectional model: TrigFlow sCM + lambda DMD (critic in state.extra)."""

  def __init__(self, config, model, *, teacher_params=None, critic_params=None):
    if teacher_params is None:
      check_frozen_config(config, "teacher_from", "teacher")
    TrigFlowSCM.__init__(self, config, model, teacher_params=teacher_params)
    t = section(config, "teacher", kind="", cfg_scale=3.0, use_ema=True)
    self.init_dmd(config, model, teacher_params=self._teacher, cfg_scale=self.cfg_scale, use_ema=t.use_ema,
                  defaults={k: DMD_DEFAULTS[k] for k in GENERATOR_KEYS}, critic_params=critic_params)
    self.dmd_weight = float(rcm_section(config).dmd_weight)

  def generate(self, params, noise, cond, rng, exit_step):
    return bidirectional_generate(self.model, params, noise, cond, self.schedule, rng, exit_step)

  def loss(self, params, frozen, batch, rng, step):
    """frozen = {"teacher", "critic"}."""
    r_dmd, r_scm = jax.random.split(rng)
    return combine(TrigFlowSCM.loss(self, params, {"teacher": frozen["teacher"]}, batch, r_scm, step),
                   self.dmd_term(params, frozen, batch, r_dmd, step), self.dmd_weight)
