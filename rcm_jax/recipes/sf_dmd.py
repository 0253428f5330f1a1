"""SF-DMD (Causal-rCM section 4): Self-Forcing rollout of the causal student + Distribution Matching Distillation
against the bidirectional teacher, with a fake-score critic trained by flow matching on student samples.

Owns: the DMD loss (`dmd_loss`, pure, scores passed in as functions), the critic's flow-matching loss, and the
recipe's own update (`init_extra` / `update`, the trainer's hook for recipes with two networks): per student
update, `dmd.critic_steps` critic updates (each on a fresh no-grad rollout), then one student update, a NaN guard
per update (a non-finite update is skipped and counted in `nan_total`), the student's EMA.

Student rollout (`rcm_jax.inference.rollout`, one implementation with streaming): chunk by chunk with a KV
cache, every chunk on the `dmd.schedule` times; the exit step cycles with the iteration, `(step % max_steps) + 1`;
only the exit step of each chunk keeps gradients, cache writes are no-grad (clean t=0 pass, or the exit step's
K/V with `dmd.noisy_context`). `dmd.replay_backprop` keeps one KV cache for the backward pass, not one per
chunk, at one more network call per chunk (`rcm_jax.inference.rollout`; for video-length rollouts at scale).
DMD: G diffused to t ~ UniformShift(dmd.time_shift), x0_fake = critic (initialised from the teacher), x0_real =
teacher with CFG teacher.cfg_scale (paper: 5), grad = (x0_fake - x0_real) / mean|G - x0_real|,
loss = mean (G - sg(G - grad))^2.

The DMD machinery (critic, its optimizer and update ratio, the DMD term, the NaN guard, the update) is the mixin
`DistributionMatching`, shared with the joint and bidirectional rCM recipes (`rcm.py`); a recipe supplies only the
student's generation (`generate`). Non-finite updates (loss, gradient or the optimizer's update) are skipped; a
step whose critic updates failed also keeps the student as it was, so a diverging critic freezes the whole state
(the trainer stops after train.nan_patience such steps, and every checkpoint written meanwhile holds the last good
networks). The teacher (`teacher_from`) and the critic's initialisation (`critic_from`, "" = the teacher) must
score the student's latents with its conditioning: their configs and param trees are compared before any compute.

Config keys: dmd.{schedule, critic_steps, time_shift, noisy_context, cache_keys, cache_frames, replay_backprop},
optim_critic.{lr, b1, b2, eps, weight_decay, warmup_steps, mu_dtype}, teacher.{cfg_scale, use_ema}, teacher_from,
critic_from, causal.*.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rcm_jax.diffusion import flow, samplers
from rcm_jax.inference import rollout as rollout_lib
from rcm_jax.inference.causal_sample import guided_call
from rcm_jax.recipes.base import register
from rcm_jax.recipes.causal import CausalRecipe, RecipeConfigError, check_params_fit, load_frozen, section

DMD_DEFAULTS = dict(schedule=tuple(samplers.FOUR_STEP),   # the paper's 4-step times [1600/1601, 15/16, 5/6, 5/8, 0]
                    critic_steps=5, time_shift=5.0, noisy_context=False, cache_keys="post_rope", cache_frames=0,
                    replay_backprop=False)
GENERATOR_KEYS = ("schedule", "critic_steps", "time_shift")   # what a generator without a KV cache reads
CRITIC_OPTIM_DEFAULTS = dict(lr=4e-7, b1=0.0, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0,
                             mu_dtype="float32")


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


# ----------------------------------------------------------------------------- frozen networks vs the student
# Stage-config keys that fix what a network reads and writes: (key, what it decides).
FROZEN_CONFIG_KEYS = (("world", "the conditioning: labels, or actions and the first frame"),
                      ("data.world.channels", "the latent channels"),
                      ("data.world.size", "the latent height and width"),
                      ("model.patch_size", "how latents are patched"))


def _lookup(tree: dict, dotted: str):
  for part in dotted.split("."):
    if not isinstance(tree, dict) or part not in tree:
      return None
    tree = tree[part]
  return tree


def check_frozen_config(config, key: str, role: str) -> None:
  """The stage at config.<key> (its config.json) must share the student's world, latent shape and patching.
  Raises RecipeConfigError naming `key` and the first differing config key; silent without a config.json."""
  stage_dir = config.get(key) or ""
  path = os.path.join(stage_dir, "config.json") if stage_dir else ""
  if not path or not os.path.exists(path):
    return
  with open(path) as f:
    theirs = json.load(f)
  mine = json.loads(config.to_json_best_effort())
  for name, what in FROZEN_CONFIG_KEYS:
    a, b = _lookup(theirs, name), _lookup(mine, name)
    if a is not None and b is not None and a != b:
      raise RecipeConfigError(f"{key}={stage_dir}: the {role} was trained with {name}={a!r} ({what}), the student "
                              f"has {name}={b!r}; the {role} must read the student's latents and conditioning: "
                              f"point {key} at a stage of the same world and data.")


def network_signature(params) -> dict | None:
  """What a Wan param tree reads and writes: {in_channels, out_channels, cond_channels, num_classes, num_actions,
  patch_size}, or None when the tree is not a Wan model's."""
  p = params.get("params", params) if isinstance(params, dict) else None
  try:
    pe = tuple(p["patch_embedding"]["kernel"].shape)   # [pt, ph, pw, in + cond, dim]
    po = tuple(p["proj_out"]["kernel"].shape)          # [dim, pt ph pw out]
  except (KeyError, TypeError):
    return None
  out = po[-1] // int(np.prod(pe[:3]))
  emb = lambda name: int(p[name]["embedding"].shape[0]) - 1 if name in p else 0   # + 1 null row
  return dict(in_channels=out, out_channels=out, cond_channels=pe[3] - out, num_classes=emb("label_embedder"),
              num_actions=emb("action_embedder"), patch_size=pe[:3])


def check_frozen_params(params, model, key: str, role: str) -> None:
  """A frozen network's params must take the student's latents and conditions (named fields first), then have
  the student model's whole param tree."""
  sig = network_signature(params)
  if sig is not None:
    want = model.config
    for name, got in sig.items():
      w = tuple(getattr(want, name)) if name == "patch_size" else getattr(want, name)
      if got != w:
        raise RecipeConfigError(f"{key}: the {role}'s params have model.{name}={got!r}, the student's model has "
                                f"{w!r}; the {role} must read the student's latents and conditioning (the world "
                                f"and data.world.* fix them): point {key} at a stage of the same world and data.")
  check_params_fit(params, model, key)


def load_checked(config, model, key: str, role: str, *, use_ema: bool, kind: str = "bidirectional", params=None):
  """Params of a frozen network (given, or loaded from config.<key>), checked against the student first."""
  if params is None:
    check_frozen_config(config, key, role)
    params = load_frozen(config, model, key, use_ema=use_ema, kind=kind)
  check_frozen_params(params, model, key, role)
  return params


# ----------------------------------------------------------------------------- the DMD machinery
class DistributionMatching:
  """DMD term, fake-score critic and the two-network update, for a recipe that supplies `generate`.

  Call `init_dmd` from the recipe's __init__; `generate(params, noise, cond, rng, exit_step)` returns the student's
  sample G [B, T, H, W, C] with gradients only through `exit_step` (traced int in 1..max_steps).
  """

  def init_dmd(self, config, model, *, teacher_params, cfg_scale: float, use_ema: bool, defaults: dict,
               critic_params=None):
    d = section(config, "dmd", **defaults)
    cs = d.critic_steps
    if not isinstance(cs, (int, np.integer)) or isinstance(cs, bool) or cs < 1:
      raise RecipeConfigError(f"dmd.critic_steps must be an int >= 1 (critic updates per student update; paper: "
                              f"5), got {cs!r}.")
    self.schedule = tuple(rollout_lib.check_schedule(d.schedule, "dmd.schedule").tolist())
    if "cache_keys" in d and d.cache_keys not in rollout_lib.CACHE_KEYS:
      raise RecipeConfigError(f"dmd.cache_keys={d.cache_keys!r}: choose one of {rollout_lib.CACHE_KEYS}.")
    if float(d.time_shift) <= 0:
      raise RecipeConfigError(f"dmd.time_shift must be > 0, got {d.time_shift}.")
    self.dmd = d
    self.dmd_cfg_scale = float(cfg_scale)
    oc = section(config, "optim_critic", **CRITIC_OPTIM_DEFAULTS)
    if not oc.lr > 0:
      raise RecipeConfigError(f"optim_critic.lr must be > 0, got {oc.lr}.")
    from rcm_jax.training import optim   # lazy: training imports recipes
    try:
      self.tx_critic = optim.make_optimizer(ml_collections.ConfigDict(dict(oc, clip_norm=0.0)), "optim_critic")
    except ValueError as e:
      raise RecipeConfigError(str(e)) from None
    self.tx = optim.make_optimizer(config.optim)   # the trainer's student optimizer (same config)
    if config.get("train") and int(config.train.get("grad_accum", 1)) != 1:
      raise RecipeConfigError(f"{config.get('recipe')} does not support train.grad_accum > 1; set "
                              "train.grad_accum=1.")
    check_frozen_params(teacher_params, model, "teacher_from", "teacher")
    if critic_params is None and config.get("critic_from"):
      critic_params = load_checked(config, model, "critic_from", "critic", use_ema=use_ema)
    elif critic_params is not None:
      check_frozen_params(critic_params, model, "critic_from", "critic")
    # the fake score starts at the real one unless critic_from names another bidirectional stage
    self._critic_init = teacher_params if critic_params is None else critic_params

  @property
  def max_steps(self) -> int:
    return len(self.schedule) - 1

  def generate(self, params, noise, cond, rng, exit_step):
    raise NotImplementedError

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
    g = jax.lax.stop_gradient(self.generate(jax.lax.stop_gradient(student), noise, batch["cond"], r_roll,
                                            self.exit_step(step)))
    t = self._times(r_t, x.shape[0], x.shape[1])
    eps = jax.random.normal(r_eps, x.shape, jnp.float32)
    loss = flow_matching_loss(lambda xt, tt: self.model.apply(critic, xt, tt, **batch["cond"]), g, eps, t)
    return loss, {"critic_loss": loss}

  def dmd_term(self, params, frozen, batch, rng, step):
    """Student DMD loss on its own generation; frozen = {"teacher", "critic", ...}."""
    r_roll, r_noise, r_t, r_eps = jax.random.split(rng, 4)
    x = batch["video"]
    noise = jax.random.normal(r_noise, x.shape, jnp.float32)
    g = self.generate(params, noise, batch["cond"], r_roll, self.exit_step(step))
    t = self._times(r_t, x.shape[0], x.shape[1])
    eps = jax.random.normal(r_eps, x.shape, jnp.float32)
    fake = lambda xt, tt: self.x0_bidirectional(frozen["critic"], xt, tt, batch["cond"])
    real = lambda xt, tt: self.x0_bidirectional(frozen["teacher"], xt, tt, batch["cond"], batch["null"],
                                                self.dmd_cfg_scale)
    loss, metrics = dmd_loss(g, eps, t, fake, real)
    return loss, dict(metrics, loss=loss, exit_step=self.exit_step(step).astype(jnp.float32))

  # ------------------------------------------------------------------ the trainer's hook
  def extra_inputs(self):
    """The arrays `init_extra` starts from (the critic's initial weights), passed to it as an argument so the jit
    that builds the train state (`trainer.build_state`) takes them as inputs instead of closing over them."""
    return self._critic_init

  def init_extra(self, rng, params, inputs):
    """The critic (a copy of `inputs`: the teacher, or critic_from), its optimizer, counters."""
    critic = jax.tree.map(jnp.copy, inputs)
    return {"critic": critic, "critic_opt": self.tx_critic.init(critic),
            "critic_updates": jnp.zeros((), jnp.int32), "critic_skipped": jnp.zeros((), jnp.int32)}

  def update(self, state, frozen, batch, rng):
    """dmd.critic_steps critic updates, then one student update (+ EMA). A non-finite update (loss, gradient or
    the optimizer's update) is skipped and counted; a step with a skipped critic update keeps the student too."""
    from rcm_jax.training import ema   # lazy: training imports recipes
    ema_cfg = self.config.ema
    r_critic, r_student = jax.random.split(rng)
    extra = state.extra

    def critic_update(carry, i):
      critic, opt = carry
      (loss, _), grads = jax.value_and_grad(self.critic_loss, has_aux=True)(
          critic, state.params, batch, jax.random.fold_in(r_critic, i), state.step)
      updates, new_opt = self.tx_critic.update(grads, opt, critic)
      ok = jnp.isfinite(loss) & jnp.isfinite(_global_norm(grads)) & jnp.isfinite(_global_norm(updates))
      new_critic = optax.apply_updates(critic, updates)
      return (_keep(ok, new_critic, critic), _keep(ok, new_opt, opt)), (loss, ok)

    (critic, critic_opt), (c_losses, c_ok) = jax.lax.scan(
        critic_update, (extra["critic"], extra["critic_opt"]), jnp.arange(int(self.dmd.critic_steps)))
    c_bad = jnp.sum(~c_ok).astype(jnp.int32)

    (loss, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(
        state.params, dict(frozen, critic=critic), batch, r_student, state.step)
    grad_norm = _global_norm(grads)
    updates, new_opt = self.tx.update(grads, state.opt_state, state.params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(_global_norm(updates))
    ok = finite & (c_bad == 0)
    params = _keep(ok, optax.apply_updates(state.params, updates), state.params)
    opt_state = _keep(ok, new_opt, state.opt_state)
    new_ema = state.ema
    if state.ema is not None:
      new_ema = _keep(ok, ema.update(state.ema, params, ema.ema_decay(ema_cfg, state.step + 1)), state.ema)
    bad = (~finite).astype(jnp.int32) + c_bad
    extra = {"critic": critic, "critic_opt": critic_opt,
             "critic_updates": extra["critic_updates"] + int(self.dmd.critic_steps),
             "critic_skipped": extra["critic_skipped"] + c_bad}
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=new_ema, extra=extra,
                          nan_streak=jnp.where(bad > 0, state.nan_streak + 1, 0), nan_total=state.nan_total + bad)
    metrics = dict(metrics, grad_norm=grad_norm, skipped=(~ok).astype(jnp.float32),
                   critic_loss=jnp.mean(c_losses), critic_skipped=c_bad.astype(jnp.float32))
    return state, metrics


@register("sf_dmd")
class SelfForcingDMD(DistributionMatching, CausalRecipe):
  """SF-DMD stage: trains the causal student (state.params); the critic lives in state.extra."""
  default_teacher_kind = "bidirectional"

  def __init__(self, config, model, *, teacher_params=None, critic_params=None):
    if teacher_params is None:
      check_frozen_config(config, "teacher_from", "teacher")
    super().__init__(config, model, teacher_params=teacher_params)
    if self.teacher.kind != "bidirectional":
      raise RecipeConfigError(f"{config.get('recipe', 'sf_dmd')} needs teacher.kind='bidirectional' (the real "
                              f"score), got {self.teacher.kind!r}.")
    self.init_dmd(config, model, teacher_params=self._teacher_params, cfg_scale=self.teacher.cfg_scale,
                  use_ema=self.teacher.use_ema, defaults=DMD_DEFAULTS, critic_params=critic_params)
    frames = config.get("data", {}).get("world", {}).get("frames") if config.get("data") else None
    if frames:   # a cache too small for the rollout: refused here, before any compute
      rollout_lib.make_plan(self.pattern, int(frames), int(self.dmd.cache_frames), key="dmd.cache_frames")

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

  def generate(self, params, noise, cond, rng, exit_step):
    return self.student_rollout(params, noise, cond, rng, exit_step)

  def loss(self, params, frozen, batch, rng, step):
    """Student DMD loss; frozen = {"teacher", "critic"}."""
    return self.dmd_term(params, frozen, batch, rng, step)
