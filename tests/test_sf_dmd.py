"""SF-DMD (rcm_jax/recipes/sf_dmd.py): the DMD gradient on a Gaussian problem with exact scores, gradients only
through the exit step, the critic / student update ratio, and bad config keys."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rcm_jax import recipes
from rcm_jax.diffusion import flow
from rcm_jax.inference import rollout
from rcm_jax.models import build_model
from rcm_jax.recipes.causal import BlockPattern, RecipeConfigError
from rcm_jax.recipes.sf_dmd import dmd_loss
from rcm_jax.training.state import TrainState

B, T, HW, C = 2, 3, 8, 4
NULL = 10


def _model():
  return build_model("tiny", patch_size=(1, 4, 4), num_classes=NULL, num_layers=1)


def _params(model, seed):
  """Random params from shapes (numpy): weights ~ N(0, 1/fan_in), so the zero-init head is non-trivial."""
  b = _batch()
  shapes = jax.eval_shape(model.init, jax.random.key(0), b["video"], jnp.zeros((B, T)), labels=b["cond"]["labels"])
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name and "scale_shift" not in name:
      return jnp.asarray(1 + 0.05 * rng.normal(size=s.shape), s.dtype)
    std = 1 / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) >= 2 else 0.02
    if "time_embedder" in name or "text_embedder" in name:
      std = 0.02
    return jnp.asarray(std * rng.normal(size=s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _batch():
  rng = np.random.default_rng(0)
  return {"video": jnp.asarray(rng.uniform(-1, 1, (B, T, HW, HW, C)), jnp.float32),
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


def test_critic_and_student_update_in_ratio_with_ema():
  model = _model()
  teacher, student = _params(model, 1), _params(model, 2)
  recipe = _recipe(model, teacher)
  state = TrainState.create(student, recipe.tx, use_ema=True, extra=recipe.init_extra(jax.random.key(0), student))
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
  state, metrics = update(state, frozen, _batch(), jax.random.key(5))
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
