"""SF-DMD (rcm_jax/recipes/sf_dmd.py) and rCM (rcm_jax/recipes/rcm.py): the DMD gradient on a Gaussian problem with
exact scores, gradients only through the exit step, the critic / student update ratio, the joint TF-sCM + lambda
SF-DMD loss against its two terms computed apart, the bidirectional rCM, bad inputs named by their keys before any
compute, and a diverging critic stopping the trainer with the last good checkpoint on disk."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rcm_jax import parallel, recipes
from rcm_jax.diffusion import flow
from rcm_jax.inference import rollout
from rcm_jax.models import build_model
from rcm_jax.errors import UserError
from rcm_jax.recipes.causal import BlockPattern, RecipeConfigError
from rcm_jax.recipes.sf_dmd import dmd_loss
from rcm_jax.training import trainer
from rcm_jax.training.state import TrainState
from conftest import random_params  # noqa: E402  (tests/conftest.py: shared test helpers)

B, T, HW, C = 2, 3, 8, 4
NULL = 10


@pytest.fixture(autouse=True)
def _quick_compiles():
  """XLA's CPU optimisation passes dominate this file's time (the rollouts and updates are compiled once each and
  run a few times): about half the compile time without them; results agree to float32 rounding."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def _model():
  return build_model("tiny", patch_size=(1, 4, 4), num_classes=NULL, num_layers=1)


def _params(model, seed):
  """Random params from shapes (numpy): weights ~ N(0, 1/fan_in), so the zero-init head is non-trivial."""
  b = _batch()
  shapes = jax.eval_shape(model.init, jax.random.key(0), b["video"], jnp.zeros((B, T)), labels=b["cond"]["labels"])
  return random_params(shapes, seed)


def _batch(frames=T):
  rng = np.random.default_rng(0)
  return {"video": jnp.asarray(rng.uniform(-1, 1, (B, frames, HW, HW, C)), jnp.float32),
          "cond": {"labels": jnp.asarray([[3], [5]], jnp.int32)},
          "null": {"labels": jnp.full((B, 1), NULL, jnp.int32)}}


def _config(**dmd):
  return ml_collections.ConfigDict(dict(
      recipe="sf_dmd", causal=dict(first_chunk_frames=1, chunk_frames=1), teacher_from="",
      teacher=dict(cfg_scale=2.0), dmd=dict(dict(critic_steps=2), **dmd), optim_critic=dict(lr=1e-3),
      optim=dict(lr=1e-3, b1=0.0, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0),
      ema=dict(kind="classic", decay=0.9), train=dict(grad_accum=1)))


def _recipe(model, teacher, **dmd):
  return recipes.get_recipe("sf_dmd")(_config(**dmd), model, teacher_params=teacher)


def test_dmd_gradient_on_gaussians_with_exact_scores():
  """Data N(mu, s^2), generator N(m_g, s^2): E[x0 | x_t] = m + (1-t) s^2 (x_t - (1-t) m) / ((1-t)^2 s^2 + t^2), so
  x0_fake - x0_real = (m_g - mu) t^2 / ((1-t)^2 s^2 + t^2) exactly: descending the loss moves G toward mu."""
  mu, m_g, s = 0.5, -1.0, 0.7
  def post(m):
    def x0(x_t, t):
      t = flow.bcast(t, x_t)
      return m + (1 - t) * s ** 2 * (x_t - (1 - t) * m) / ((1 - t) ** 2 * s ** 2 + t ** 2)
    return x0
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  shape = (4, 2, 3, 3, 2)
  g = m_g + s * jax.random.normal(k1, shape)
  eps = jax.random.normal(k2, shape)
  t = jnp.broadcast_to(flow.uniform_shift(k3, (4, 1)), (4, 2))
  grad = jax.grad(lambda g: dmd_loss(g, eps, t, post(m_g), post(mu))[0])(g)
  tb = flow.bcast(t, g)
  want_dir = (m_g - mu) * tb ** 2 / ((1 - tb) ** 2 * s ** 2 + tb ** 2)
  norm = jnp.mean(jnp.abs(g - post(mu)(flow.interpolate(g, eps, t), tb)), axis=(1, 2, 3, 4), keepdims=True)
  np.testing.assert_allclose(grad, jnp.broadcast_to(2 * want_dir / norm / g.size, g.shape), rtol=1e-4, atol=1e-9)
  assert float(jnp.mean(grad)) < 0   # m_g < mu: a descent step raises G toward mu
  same, _ = dmd_loss(g, eps, t, post(mu), post(mu))
  assert float(jax.grad(lambda g: dmd_loss(g, eps, t, post(mu), post(mu))[0])(g).max()) == 0.0 and same == 0.0


def test_gradients_only_through_the_exit_step():
  model = _model()
  params, other = _params(model, 1), _params(model, 2)
  b = _batch()
  plan = rollout.make_plan(BlockPattern(1, 1), T)
  sched = ((1600 / 1601, 15 / 16, 5 / 6, 5 / 8, 0.0),) * len(plan.blocks)

  @jax.jit
  def grads(params, prefix, noise, k):
    def f(params, prefix, noise):
      g = rollout.rollout(model, params, noise, b["cond"], plan=plan, schedules=sched, rng=jax.random.key(3),
                          exit_steps=[k] * len(plan.blocks), prefix_params=prefix)
      return jnp.sum(g ** 2)
    return jax.grad(f, argnums=(0, 1, 2))(params, prefix, noise)

  noise = jax.random.normal(jax.random.key(1), b["video"].shape)
  for k in (1, 3):
    gp, gprefix, gnoise = grads(params, other, noise, jnp.int32(k))
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(gprefix)), "prefix steps got gradients"
    assert float(jnp.abs(gnoise).max()) == 0.0, "the exit step's input got gradients"
    assert float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(gp))) > 0


def test_build_state_makes_the_critic_inside_one_jit_from_its_inputs(monkeypatch):
  """The trainer's state (student optimizer, EMA, critic copied from the teacher, critic optimizer) comes out of
  one jit that takes the teacher as an input: built in pieces, the freed pieces leave holes in the GPU allocator
  (SF-DMD at 9 frames failed on an H100 for that), and closed over, the teacher would be a constant of the
  program."""
  model = _model()
  teacher, student = _params(model, 1), _params(model, 2)
  recipe = _recipe(model, teacher)
  plan = parallel.plan_from_config(ml_collections.ConfigDict({"mesh": {"data": 1}}), jax.devices()[:1])
  built = []
  def spy(plan, fn, *args):
    built.append(jax.make_jaxpr(fn)(*args))
    return real_build(plan, fn, *args)
  real_build = parallel.build
  monkeypatch.setattr(parallel, "build", spy)
  state = trainer.build_state(plan, recipe, recipe.tx, student, jax.random.key(0), use_ema=True)
  assert len(built) == 1, "the state was built by more than one jit"
  n_teacher = sum(x.size for x in jax.tree.leaves(teacher))
  assert sum(np.size(c) for c in built[0].consts) < n_teacher // 10, "the jit closes over the critic's weights"
  # its inputs are the student, the teacher and the rng (not a critic and optimizer state made before it)
  assert len(built[0].in_avals) == len(jax.tree.leaves(student)) + len(jax.tree.leaves(teacher)) + 1
  eager = TrainState.create(student, recipe.tx, use_ema=True,
                            extra=recipe.init_extra(jax.random.key(0), student, recipe.extra_inputs()))
  assert jax.tree.structure(state) == jax.tree.structure(eager)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(eager)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for c, t in zip(jax.tree.leaves(state.extra["critic"]), jax.tree.leaves(teacher)):
    np.testing.assert_array_equal(np.asarray(c), np.asarray(t))


def test_critic_and_student_update_in_ratio_with_ema():
  model = _model()
  teacher, student = _params(model, 1), _params(model, 2)
  recipe = _recipe(model, teacher)
  state = trainer.build_state(None, recipe, recipe.tx, student, jax.random.key(0), use_ema=True)
  update = jax.jit(recipe.update)
  frozen = recipe.frozen_params()
  for i in range(2):
    state, metrics = update(state, frozen, _batch(), jax.random.key(i))
  assert int(state.step) == 2 and int(state.extra["critic_updates"]) == 4 and int(state.nan_total) == 0
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["critic_loss"]) and metrics["exit_step"] == 2.0
  moved = lambda a, b: float(sum(jnp.abs(x - y).sum() for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
  assert moved(state.extra["critic"], teacher) > 0 and moved(state.params, student) > 0
  assert 0 < moved(state.ema, student) < moved(state.params, student)
  # a diverged critic: its update is skipped (kept as is) and counted, the streak grows
  bad = jax.tree.map(lambda x: x * jnp.nan, state.extra["critic"])
  state = state.replace(extra=dict(state.extra, critic=bad))
  kept = state
  state, metrics = update(state, frozen, _batch(), jax.random.key(5))
  assert moved(state.params, kept.params) == 0 and moved(state.ema, kept.ema) == 0   # the student is kept too
  assert int(state.extra["critic_skipped"]) == 2 and int(state.extra["critic_updates"]) == 6
  assert int(state.nan_total) >= 2 and int(state.nan_streak) == 1 and metrics["critic_skipped"] == 2.0
  assert all(bool(jnp.isnan(x).all()) for x in jax.tree.leaves(state.extra["critic"]))


def test_bad_config_names_the_key():
  model = _model()
  teacher = _params(model, 1)
  with pytest.raises(RecipeConfigError, match="dmd.critic_steps"):
    _recipe(model, teacher, critic_steps=0)
  with pytest.raises(ValueError, match="dmd.schedule"):
    _recipe(model, teacher, schedule=(1.0, 0.5, 0.7, 0.0))
  with pytest.raises(RecipeConfigError, match="dmd.cache_keys"):
    _recipe(model, teacher, cache_keys="int8")
  with pytest.raises(RecipeConfigError, match="dmd.bogus"):
    _recipe(model, teacher, bogus=1)
  cfg = _config()
  cfg.optim_critic.mu_dtype = "float8"
  with pytest.raises(RecipeConfigError, match="optim_critic.mu_dtype"):
    recipes.get_recipe("sf_dmd")(cfg, model, teacher_params=teacher)


@pytest.mark.slow
def test_replay_backprop_gives_the_same_gradients():
  model = _model()
  teacher, student = _params(model, 1), _params(model, 2)
  b = _batch()
  out = []
  for replay in (False, True):
    recipe = _recipe(model, teacher, replay_backprop=replay)
    frozen = dict(recipe.frozen_params(), critic=teacher)
    out.append(jax.jit(jax.grad(lambda p: recipe.loss(p, frozen, b, jax.random.key(0), 1)[0]))(student))
  for a, c in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- rCM: joint and bidirectional
def _cfg(recipe, **sections):
  """A recipe config over the sf_dmd test defaults; a section given as a dict is merged, None removes it."""
  base = _config().to_dict()
  base["recipe"] = recipe
  base["dmd"] = dict(critic_steps=1)
  for k, v in sections.items():
    if v is None:
      base.pop(k, None)
    else:
      base[k] = dict(base.get(k) or {}, **v) if isinstance(v, dict) else v
  return ml_collections.ConfigDict(base)


def _run_updates(recipe, student, n, frames=2):
  state = trainer.build_state(None, recipe, recipe.tx, student, jax.random.key(0), use_ema=True)
  update = jax.jit(recipe.update)
  out = []
  for i in range(n):
    before = state
    state, m = update(state, recipe.frozen_params(), _batch(frames), jax.random.key(10 + i))
    out.append({k: float(v) for k, v in m.items()})
  return before, state, out


def _moved(a, b):
  return float(sum(jnp.abs(x - y).sum() for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def test_joint_loss_is_the_tf_scm_loss_plus_lambda_times_the_sf_dmd_loss():
  """rcm_joint's loss against tf_scm's and sf_dmd's losses built apart (eager, on the rngs split(rng) = (r_dmd,
  r_scm)), with lambda drawn at random; scm.loss_scale is lowered so that both terms weigh alike (the sCM loss sits
  near its scale, the DMD loss is small)."""
  model = _model()
  seeds = np.random.default_rng().integers(0, 2 ** 30, 5)
  teacher, tf_teacher, critic, student = (_params(model, int(s)) for s in seeds[:4])
  lam = float(np.random.default_rng().uniform(0.5, 2.0))
  scm_cfg = dict(warmup_steps=0, loss_scale=0.01)
  b, step, rng = _batch(2), 3, jax.random.key(int(seeds[4]))
  joint = recipes.get_recipe("rcm_joint")(_cfg("rcm_joint", rcm=dict(dmd_weight=lam), scm=scm_cfg), model,
                                          teacher_params=teacher, scm_teacher_params=tf_teacher)
  frozen = joint.frozen_params()
  assert set(frozen) == {"teacher", "scm_teacher"}
  got, m = jax.jit(joint.loss)(student, dict(frozen, critic=critic), b, rng, step)
  scm = recipes.get_recipe("tf_scm")(_cfg("tf_scm", teacher=dict(kind="causal"), scm=scm_cfg), model,
                                     teacher_params=tf_teacher)
  sf = recipes.get_recipe("sf_dmd")(_cfg("sf_dmd"), model, teacher_params=teacher)
  r_dmd, r_scm = jax.random.split(rng)
  want_scm, _ = scm.loss(student, {"teacher": tf_teacher}, b, r_scm, step)
  want_dmd, _ = sf.loss(student, {"teacher": teacher, "critic": critic}, b, r_dmd, step)
  assert 1e-3 < lam * float(want_dmd) / float(want_scm) < 1e3, (float(want_scm), float(want_dmd))
  np.testing.assert_allclose(float(m["scm_loss"]), float(want_scm), rtol=1e-4)
  np.testing.assert_allclose(float(m["dmd_loss"]), float(want_dmd), rtol=1e-4)
  np.testing.assert_allclose(float(got), float(want_scm) + lam * float(want_dmd), rtol=1e-4)


@pytest.mark.slow   # the update machinery's fast paths: the ratio and bidirectional update tests, the joint loss test
def test_joint_rcm_updates_run_finite_with_one_teacher():
  model = _model()
  teacher, student = _params(model, 1), _params(model, 2)
  recipe = recipes.get_recipe("rcm_joint")(_cfg("rcm_joint", rcm=dict(dmd_weight=1.0), scm=dict(warmup_steps=0)),
                                           model, teacher_params=teacher)
  assert set(recipe.frozen_params()) == {"teacher"}   # scm_teacher_from = "": the sCM term reads the DMD teacher
  _, state, ms = _run_updates(recipe, student, 3)
  assert all(np.isfinite(m[k]) for m in ms for k in ("loss", "scm_loss", "dmd_loss", "critic_loss", "g_norm"))
  assert [m["exit_step"] for m in ms] == [1.0, 2.0, 3.0] and int(state.nan_total) == 0
  assert int(state.extra["critic_updates"]) == 3 and _moved(state.params, student) > 0
  assert _moved(state.extra["critic"], teacher) > 0


def test_bidirectional_generator_matches_a_plain_consistency_loop_and_grads_only_at_the_exit():
  from rcm_jax.recipes.rcm import bidirectional_generate
  model = _model()
  params, other = _params(model, 1), _params(model, 2)
  b = _batch()
  times = (1600 / 1601, 15 / 16, 5 / 6, 5 / 8, 0.0)
  noise = jax.random.normal(jax.random.key(1), b["video"].shape)
  rng = jax.random.key(7)
  gen = jax.jit(lambda p, pre, x, k: bidirectional_generate(model, p, x, b["cond"], times, rng, k, prefix_params=pre))
  for k in (1, 3):   # reference: a Python loop of the few-step consistency sampler, prefix steps on `other`
    x = np.asarray(noise, np.float64) * times[0]
    keys = jax.random.split(rng, 4)
    for s in range(k):
      tt = jnp.full((B, T), times[s], jnp.float32)
      v = np.asarray(model.apply(params if s == k - 1 else other, jnp.asarray(x, jnp.float32), tt, **b["cond"]))
      x0 = x - times[s] * v
      if s < k - 1:
        x = (1 - times[s + 1]) * x0 + times[s + 1] * np.asarray(jax.random.normal(keys[s], x.shape))
    np.testing.assert_allclose(gen(params, other, noise, jnp.int32(k)), x0, rtol=1e-4, atol=1e-5)
  gp, gpre = jax.grad(lambda p, pre: jnp.sum(gen(p, pre, noise, jnp.int32(3)) ** 2), argnums=(0, 1))(params, other)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(gpre))
  assert float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(gp))) > 0


def test_bidirectional_rcm_runs_a_few_steps():
  model = _model()
  teacher, student = _params(model, 1), _params(model, 2)
  recipe = recipes.get_recipe("rcm_bidirectional")(
      _cfg("rcm_bidirectional", causal=None, teacher=dict(kind="bidirectional"), rcm=dict(dmd_weight=0.5),
           scm=dict(warmup_steps=0)), model, teacher_params=teacher)
  _, state, ms = _run_updates(recipe, student, 2)
  assert all(np.isfinite(m[k]) for m in ms for k in ("loss", "scm_loss", "dmd_loss", "critic_loss", "g_norm"))
  for m in ms:
    np.testing.assert_allclose(m["loss"], m["scm_loss"] + 0.5 * m["dmd_loss"], rtol=1e-5)
  assert int(state.nan_total) == 0 and int(state.extra["critic_updates"]) == 2
  assert _moved(state.params, student) > 0 and _moved(state.extra["critic"], teacher) > 0


# ----------------------------------------------------------------------------- bad input, before any compute
def _zeros(model):
  from rcm_jax.models.wan import dummy_inputs
  args, kwargs = dummy_inputs(model.config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def test_a_rollout_longer_than_the_kv_cache_without_a_window_is_refused_naming_the_key():
  model = _model()
  teacher = _params(model, 1)
  cfg = _config(cache_frames=1)
  cfg.data = dict(world=dict(frames=3))
  with pytest.raises(rollout.RolloutConfigError, match=r"dmd\.cache_frames=1 and there is no rolling window"):
    recipes.get_recipe("sf_dmd")(cfg, model, teacher_params=teacher)
  cfg.causal.local_blocks = 2   # a window of the block and the one before it: one cached frame is enough
  recipes.get_recipe("sf_dmd")(cfg, model, teacher_params=teacher)


@pytest.mark.parametrize("fields,key", [(dict(in_channels=3, out_channels=3), "model.in_channels"),
                                        (dict(num_classes=7), "model.num_classes"),
                                        (dict(num_actions=5), "model.num_actions"),
                                        (dict(cond_channels=2), "model.cond_channels")])
def test_a_teacher_or_critic_with_other_latents_or_conditions_is_refused_naming_the_key(fields, key):
  model = _model()
  other = _zeros(build_model("tiny", patch_size=(1, 4, 4), num_layers=1, **dict(dict(num_classes=NULL), **fields)))
  good = _zeros(model)
  for recipe, kw, name in (("sf_dmd", dict(teacher_params=other), "teacher_from"),
                           ("sf_dmd", dict(teacher_params=good, critic_params=other), "critic_from"),
                           ("rcm_joint", dict(teacher_params=good, scm_teacher_params=other), "scm_teacher_from"),
                           ("rcm_bidirectional", dict(teacher_params=other), "teacher_from")):
    cfg = _cfg(recipe, **({"causal": None, "teacher": dict(kind="bidirectional")} if recipe == "rcm_bidirectional"
                          else {}))
    with pytest.raises(RecipeConfigError, match=f"{name}: .*{key}"):
      recipes.get_recipe(recipe)(cfg, model, **kw)


@pytest.mark.parametrize("key,theirs", [("world", "camera_pan"), ("data.world.channels", 3)])
def test_a_teacher_stage_of_another_world_is_refused_from_its_config_before_loading(tmp_path, key, theirs):
  model = _model()
  mine = dict(world="moving_digits", data=dict(world=dict(channels=4, size=HW)), model=dict(patch_size=[1, 4, 4]))
  stage = json.loads(json.dumps(mine))
  if key == "world":
    stage["world"] = theirs
  else:
    stage["data"]["world"]["channels"] = theirs
  (tmp_path / "config.json").write_text(json.dumps(stage))   # no checkpoint: the check comes before any load
  for recipe, extra in (("sf_dmd", {}), ("rcm_bidirectional", {"causal": None})):
    cfg = _cfg(recipe, teacher_from=str(tmp_path), teacher=dict(kind="bidirectional"), **extra, **mine)
    with pytest.raises(RecipeConfigError, match=f"teacher_from=.*{key}={theirs!r}"):
      recipes.get_recipe(recipe)(cfg, model)


def test_rcm_bad_keys_are_named():
  model = _model()
  teacher = _params(model, 1)
  bi = dict(causal=None, teacher=dict(kind="bidirectional"))
  for recipe, extra in (("rcm_joint", {}), ("rcm_bidirectional", bi)):
    for sections, key in ((dict(rcm=dict(dmd_weight=0.0)), "rcm.dmd_weight"),
                          (dict(dmd=dict(critic_steps=0)), "dmd.critic_steps"),
                          (dict(dmd=dict(schedule=(1.0, 0.5, 0.5, 0.0))), "dmd.schedule"),
                          (dict(rcm=dict(lambda_=1.0)), "rcm.lambda_")):
      with pytest.raises(UserError, match=key.replace(".", r"\.")):
        recipes.get_recipe(recipe)(_cfg(recipe, **extra, **sections), model, teacher_params=teacher)
  with pytest.raises(RecipeConfigError, match=r"dmd\.cache_frames"):   # no KV cache in the bidirectional rCM
    recipes.get_recipe("rcm_bidirectional")(_cfg("rcm_bidirectional", dmd=dict(cache_frames=4), **bi), model,
                                            teacher_params=teacher)


# ----------------------------------------------------------------------------- a diverging critic
def test_a_diverging_critic_stops_the_trainer_with_the_last_good_checkpoint_on_disk(tmp_path, monkeypatch):
  """NaN enters the critic's loss from step 2 on: its updates are skipped, the step keeps the student too, and after
  train.nan_patience = 2 such steps the trainer raises TrainingDiverged. The newest checkpoint holds exactly the
  networks of the last good step, and restores."""
  import importlib.util
  import optax
  from rcm_jax.models.wan import dummy_inputs
  from rcm_jax.recipes.sf_dmd import DistributionMatching, SelfForcingDMD
  from rcm_jax.training import checkpoint, pipeline, trainer
  from rcm_jax.training import setup as setup_lib

  spec = importlib.util.spec_from_file_location(
      "toy_sf_dmd", os.path.join(os.path.dirname(__file__), "..", "configs", "toy", "sf_dmd.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = pipeline.stage_config(mod.get_config("runlocal"), "sf_dmd", str(tmp_path))
  tdir = str(tmp_path / "teacher")
  cfg.init_from, cfg.teacher_from = "", tdir
  cfg.data.world.frames, cfg.data.num_train_videos, cfg.data.num_eval_videos = 2, 8, 4
  cfg.model.num_layers, cfg.dmd.critic_steps = 1, 1
  cfg.train.update(batch_size=2, num_steps=8, ckpt_every=1, keep=10, nan_patience=2, progress=False)
  model = setup_lib.make_model(cfg)
  args, kwargs = dummy_inputs(model.config)
  rng = np.random.default_rng()
  teacher = jax.tree.map(lambda x: x + 0.02 * rng.normal(size=x.shape).astype(np.float32),
                         model.init(jax.random.key(1), *args, **kwargs))
  mngr = checkpoint.manager(os.path.join(tdir, "ckpt"), keep=1, save_every=1)
  checkpoint.save(mngr, 1, TrainState.create(teacher, optax.identity(), use_ema=False), force=True)
  mngr.wait_until_finished()
  mngr.close()

  def nan_from_step_2(self, critic, student, batch, rng, step):
    loss, metrics = DistributionMatching.critic_loss(self, critic, student, batch, rng, step)
    return loss * jnp.where(step >= 2, jnp.nan, 1.0), metrics
  monkeypatch.setattr(SelfForcingDMD, "critic_loss", nan_from_step_2)

  workdir = str(tmp_path / "sf_dmd")
  with pytest.raises(trainer.TrainingDiverged, match="train.nan_patience"):
    trainer.train(cfg, workdir)
  recipe = recipes.get_recipe("sf_dmd")(cfg, model)
  params = model.init(jax.random.key(0), *args, **kwargs)
  template = trainer.build_state(None, recipe, recipe.tx, params, jax.random.key(0), use_ema=True)
  mngr = checkpoint.manager(os.path.join(workdir, "ckpt"), keep=10, save_every=1)
  assert sorted(mngr.all_steps()) == [1, 2, 3]   # step 4 (the second bad one) raised before its save
  good, _ = checkpoint.restore(mngr, template, step=2)
  last, _ = checkpoint.restore(mngr, template, step=3)
  mngr.close()
  assert int(good.nan_streak) == 0 and int(last.nan_streak) == 1 and int(last.extra["critic_skipped"]) == 1
  for name in ("params", "ema", "opt_state"):
    for a, b in zip(jax.tree.leaves(getattr(good, name)), jax.tree.leaves(getattr(last, name))):
      np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(good.extra["critic"]), jax.tree.leaves(last.extra["critic"])):
    np.testing.assert_array_equal(a, b)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((last.params, last.ema, last.extra)))
  loaded, step = checkpoint.load_params(workdir, use_ema=True)
  assert step == 3
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(good.ema)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- the toy recipes end to end
def _toy(path, arg):
  import importlib.util
  spec = importlib.util.spec_from_file_location("toy_cfg", os.path.join(os.path.dirname(__file__), "..", path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.mark.slow
@pytest.mark.parametrize("path,arg,stage,evaluated", [
    ("configs/toy/rcm_bidirectional.py", "runlocal", "rcm", "eval_rcm"),
    ("configs/toy/sf_dmd.py", "joint=0.01,runlocal", "rcm_joint", "eval_sf")])
def test_toy_rcm_recipes_runlocal_complete(tmp_path, path, arg, stage, evaluated):
  from rcm_jax.training import pipeline
  cfg = _toy(path, arg)
  results = pipeline.run_recipe(cfg, str(tmp_path))
  trained = json.loads((tmp_path / stage / "metrics.json").read_text())
  assert trained["step"] == 2 and trained["nan_skipped"] == 0
  assert np.isfinite(trained["final_loss"]) and np.isfinite(trained["final_dmd_loss"])
  assert np.isfinite(trained["final_scm_loss"]) and trained["final_critic_loss"] > 0
  assert (tmp_path / evaluated / "metrics.json").exists() and evaluated in results
