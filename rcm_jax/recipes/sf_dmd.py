"""SF-DMD (Causal-rCM section 4): Self-Forcing rollout of the causal student + Distribution Matching Distillation
against the bidirectional teacher, with a fake-score critic trained by flow matching on student samples.

Owns: the DMD loss (`dmd_loss`, pure, scores passed in as functions), the critic's flow-matching loss, and the
recipe's own update (`init_extra` / `update`, the trainer's hook for recipes with two networks): per student
update, `dmd.critic_steps` critic updates (each on a fresh no-grad rollout), then one student update, a NaN guard
per update (a non-finite update is skipped and counted in `nan_total`), the student's EMA.

Student rollout (`rcm_jax.inference.rollout`, one implementation with streaming): chunk by chunk with a KV
cache, every chunk on the `dmd.schedule` times; the exit step cycles with the iteration, `(step % max_steps) + 1`;
only the exit step of each chunk keeps gradients, cache writes are no-grad (clean t=0 pass, or the exit step's
K/V with `dmd.noisy_context`). `dmd.replay_backprop` rebuilds each chunk's exit call in the backward pass.
DMD: G diffused to t ~ UniformShift(dmd.time_shift), x0_fake = critic (initialised from the teacher), x0_real =
teacher with CFG teacher.cfg_scale (paper: 5), grad = (x0_fake - x0_real) / mean|G - x0_real|,
loss = mean (G - sg(G - grad))^2.

Config keys: dmd.{schedule, critic_steps, time_shift, noisy_context, cache_keys, cache_frames, replay_backprop},
optim_critic.{lr, b1, b2, eps, weight_decay, warmup_steps}, teacher.{cfg_scale, use_ema}, teacher_from, causal.*.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rcm_jax.diffusion import flow, samplers
from rcm_jax.inference import rollout as rollout_lib
from rcm_jax.inference.causal_sample import guided_call
from rcm_jax.recipes.base import register
from rcm_jax.recipes.causal import CausalRecipe, RecipeConfigError, section

DMD_DEFAULTS = dict(schedule=tuple(samplers.FOUR_STEP),   # the paper's 4-step times [1600/1601, 15/16, 5/6, 5/8, 0]
                    critic_steps=5, time_shift=5.0, noisy_context=False, cache_keys="post_rope", cache_frames=0,
                    replay_backprop=False)
CRITIC_OPTIM_DEFAULTS = dict(lr=4e-7, b1=0.0, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0)


def dmd_loss(g, eps, t, x0_fake_fn, x0_real_fn):
  """DMD loss of generator output g [B, T, H, W, C] (with gradients) at times t [B, T].

  x0_fake_fn / x0_real_fn: (x_t, t) -> x0 predictions of the fake and real scores (stop-gradient here).
  Returns (loss, metrics); d loss / d g = 2 (x0_fake - x0_real) / (mean|g - x0_real| * numel).
  """
  sg = jax.lax.stop_gradient
  g = g.astype(jnp.float32)
  x_t = flow.interpolate(sg(g), eps, t)
  x0_fake = sg(x0_fake_fn(x_t, t)).astype(jnp.float32)
  x0_real = sg(x0_real_fn(x_t, t)).astype(jnp.float32)
  norm = sg(jnp.mean(jnp.abs(g - x0_real), axis=tuple(range(1, g.ndim)), keepdims=True))   # [B, 1, 1, 1, 1]
  grad = (x0_fake - x0_real) / norm
  loss = jnp.mean((g - sg(g - grad)) ** 2)
  return loss, {"dmd_loss": loss, "dmd_grad_norm": jnp.sqrt(jnp.mean(grad ** 2)), "dmd_norm": jnp.mean(norm)}


def flow_matching_loss(velocity_fn, x0, eps, t):
  """Critic loss: mean (v(x_t, t) - (eps - x0))^2 on x0 = stop-gradient student samples [B, T, H, W, C]."""
  x0 = jax.lax.stop_gradient(x0)
  v = velocity_fn(flow.interpolate(x0, eps, t), t)
  return jnp.mean((v - flow.velocity_target(x0, eps)) ** 2)


def _keep(ok, new, old):
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


@register("sf_dmd")
class SelfForcingDMD(CausalRecipe):
  """SF-DMD stage: trains the causal student (state.params); the critic lives in state.extra."""
  default_teacher_kind = "bidirectional"

  def __init__(self, config, model, *, teacher_params=None):
    super().__init__(config, model, teacher_params=teacher_params)
    if self.teacher.kind != "bidirectional":
      raise RecipeConfigError(f"sf_dmd needs teacher.kind='bidirectional' (the real score), got "
                              f"{self.teacher.kind!r}.")
    d = section(config, "dmd", **DMD_DEFAULTS)
    cs = d.critic_steps
    if not isinstance(cs, (int, np.integer)) or isinstance(cs, bool) or cs < 1:
      raise RecipeConfigError(f"dmd.critic_steps must be an int >= 1 (critic updates per student update; paper: "
                              f"5), got {cs!r}.")
    self.schedule = tuple(rollout_lib.check_schedule(d.schedule, "dmd.schedule").tolist())
    if d.cache_keys not in rollout_lib.CACHE_KEYS:
      raise RecipeConfigError(f"dmd.cache_keys={d.cache_keys!r}: choose one of {rollout_lib.CACHE_KEYS}.")
    if float(d.time_shift) <= 0:
      raise RecipeConfigError(f"dmd.time_shift must be > 0, got {d.time_shift}.")
    self.dmd = d
    oc = section(config, "optim_critic", **CRITIC_OPTIM_DEFAULTS)
    if oc.lr <= 0:
      raise RecipeConfigError(f"optim_critic.lr must be > 0, got {oc.lr}.")
    from rcm_jax.training import optim   # lazy: training imports recipes
    self.tx_critic = optim.make_optimizer(ml_collections.ConfigDict(dict(oc, clip_norm=0.0)))
    self.tx = optim.make_optimizer(config.optim)   # the trainer's student optimizer (same config)
    if config.get("train") and int(config.train.get("grad_accum", 1)) != 1:
      raise RecipeConfigError("sf_dmd does not support train.grad_accum > 1; set train.grad_accum=1.")

  @property
  def max_steps(self) -> int:
    return len(self.schedule) - 1

  # ------------------------------------------------------------------ networks
  def plan(self, x):
    lay = self.layout(x)
    return rollout_lib.make_plan(self.pattern, lay.num_frames, int(self.dmd.cache_frames), key="dmd.cache_frames")

  def student_rollout(self, params, noise, cond, rng, exit_step, *, prefix_params=None):
    """G [B, T, H, W, C]: the student's rollout, exiting at `exit_step` (traced int in 1..max_steps) per chunk."""
    plan = self.plan(noise)
    nb = len(plan.blocks)
    return rollout_lib.rollout(self.model, params, noise, cond, plan=plan, schedules=(self.schedule,) * nb,
                               solver="consistency", noisy_context=bool(self.dmd.noisy_context),
                               cache_keys=self.dmd.cache_keys, rng=rng, exit_steps=[exit_step] * nb,
                               prefix_params=prefix_params, replay_backprop=bool(self.dmd.replay_backprop))

  def x0_bidirectional(self, params, x_t, t, cond, null=None, scale=1.0):
    """x0 prediction x_t - t v of a bidirectional network (teacher or critic), CFG when scale != 1."""
    fn = lambda x, tt, c: self.model.apply(params, x, tt, **c)
    v = guided_call(fn, cond, null if null is not None else cond, scale, x_t, t)
    return flow.x0_from_velocity(x_t, t, v)

  def exit_step(self, step):
    return (jnp.asarray(step, jnp.int32) % self.max_steps) + 1

  def _times(self, rng, b, nf):
    return jnp.broadcast_to(flow.uniform_shift(rng, (b, 1), shift_s=float(self.dmd.time_shift)), (b, nf))

  # ------------------------------------------------------------------ losses
  def critic_loss(self, critic, student, batch, rng, step):
    r_roll, r_noise, r_t, r_eps = jax.random.split(rng, 4)
    x = batch["video"]
    noise = jax.random.normal(r_noise, x.shape, jnp.float32)
    g = jax.lax.stop_gradient(self.student_rollout(jax.lax.stop_gradient(student), noise, batch["cond"], r_roll,
                                                   self.exit_step(step)))
    t = self._times(r_t, x.shape[0], x.shape[1])
    eps = jax.random.normal(r_eps, x.shape, jnp.float32)
    loss = flow_matching_loss(lambda xt, tt: self.model.apply(critic, xt, tt, **batch["cond"]), g, eps, t)
    return loss, {"critic_loss": loss}

  def loss(self, params, frozen, batch, rng, step):
    """Student DMD loss; frozen = {"teacher", "critic"}."""
    r_roll, r_noise, r_t, r_eps = jax.random.split(rng, 4)
    x = batch["video"]
    noise = jax.random.normal(r_noise, x.shape, jnp.float32)
    g = self.student_rollout(params, noise, batch["cond"], r_roll, self.exit_step(step))
    t = self._times(r_t, x.shape[0], x.shape[1])
    eps = jax.random.normal(r_eps, x.shape, jnp.float32)
    fake = lambda xt, tt: self.x0_bidirectional(frozen["critic"], xt, tt, batch["cond"])
    real = lambda xt, tt: self.x0_bidirectional(frozen["teacher"], xt, tt, batch["cond"], batch["null"],
                                                self.teacher.cfg_scale)
    loss, metrics = dmd_loss(g, eps, t, fake, real)
    return loss, dict(metrics, loss=loss, exit_step=self.exit_step(step).astype(jnp.float32))

  # ------------------------------------------------------------------ the trainer's hook
  def init_extra(self, rng, params):
    """The critic (a copy of the teacher: the fake score starts at the real one), its optimizer, counters."""
    critic = jax.tree.map(jnp.copy, self._teacher_params)
    return {"critic": critic, "critic_opt": self.tx_critic.init(critic),
            "critic_updates": jnp.zeros((), jnp.int32), "critic_skipped": jnp.zeros((), jnp.int32)}

  def update(self, state, frozen, batch, rng):
    """dmd.critic_steps critic updates, then one student update (+ EMA). Non-finite updates are skipped."""
    from rcm_jax.training import ema   # lazy: training imports recipes
    ema_cfg = self.config.ema
    r_critic, r_student = jax.random.split(rng)
    extra = state.extra

    def critic_update(carry, i):
      critic, opt = carry
      (loss, _), grads = jax.value_and_grad(self.critic_loss, has_aux=True)(
          critic, state.params, batch, jax.random.fold_in(r_critic, i), state.step)
      ok = jnp.isfinite(loss) & jnp.isfinite(_global_norm(grads))
      updates, new_opt = self.tx_critic.update(grads, opt, critic)
      new_critic = optax.apply_updates(critic, updates)
      return (_keep(ok, new_critic, critic), _keep(ok, new_opt, opt)), (loss, ok)

    (critic, critic_opt), (c_losses, c_ok) = jax.lax.scan(
        critic_update, (extra["critic"], extra["critic_opt"]), jnp.arange(int(self.dmd.critic_steps)))
    c_bad = jnp.sum(~c_ok).astype(jnp.int32)

    (loss, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(
        state.params, dict(frozen, critic=critic), batch, r_student, state.step)
    grad_norm = _global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = self.tx.update(grads, state.opt_state, state.params)
    params = _keep(ok, optax.apply_updates(state.params, updates), state.params)
    opt_state = _keep(ok, new_opt, state.opt_state)
    new_ema = state.ema
    if state.ema is not None:
      new_ema = _keep(ok, ema.update(state.ema, params, ema.ema_decay(ema_cfg, state.step + 1)), state.ema)
    bad = (~ok).astype(jnp.int32) + c_bad
    extra = {"critic": critic, "critic_opt": critic_opt,
             "critic_updates": extra["critic_updates"] + int(self.dmd.critic_steps),
             "critic_skipped": extra["critic_skipped"] + c_bad}
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=new_ema, extra=extra,
                          nan_streak=jnp.where(bad > 0, state.nan_streak + 1, 0), nan_total=state.nan_total + bad)
    metrics = dict(metrics, grad_norm=grad_norm, skipped=(~ok).astype(jnp.float32),
                   critic_loss=jnp.mean(c_losses), critic_skipped=c_bad.astype(jnp.float32))
    return state, metrics
