"""Sharded training on 8 fake CPU devices: meshes give the single-device step, checkpoints cross meshes,
Ulysses context parallelism (context=2/4, with fsdp / tensor / data) gives the one-device TF, TF-sCM, TF-dCM and
SF-DMD steps, the one-device JVP through the model (Pallas kernel, interpret mode) and a KV-cache rollout on a
sequence-sharded cache; bad context meshes fail before compiling.

JAX fixes its device count at import, and the pytest worker has already imported it with one device, so the
mesh scenarios run in a subprocess: this file run as a script with XLA_FLAGS forcing 8 host devices, which
prints one JSON line of results that the tests below check. Mesh / batch / rules errors are pure functions
and are tested in-process. The context-parallel scenarios run in a second subprocess (`cp`), after the first.
"""
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every mesh costs one compilation of the update (~10 s on 2 shared cores): the issue's four for the RF teacher,
# one mixed mesh for TF diffusion.
MESHES = {"data8": dict(data=8), "data2_fsdp4": dict(data=2, fsdp=4), "fsdp8": dict(fsdp=8),
          "data4_tensor2": dict(data=4, tensor=2)}
TF_MESHES = {"data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2)}
# Context parallelism (the toy TF sequence: 2 x 8 frames x 16 tokens = 256; 4 heads): one compilation each,
# plus one for each recipe's one-device reference. The `slow` group runs in its own subprocess under -m slow.
CP_MESHES = {
    "tf": {"context4_fsdp2": dict(context=4, fsdp=2)},
    "tf_scm": {"data2_context2_tensor2": dict(data=2, context=2, tensor=2)},
    "tf_dcm": {"context2_fsdp4": dict(context=2, fsdp=4)},
}
CP_MESHES_SLOW = {
    "tf": {"data4_context2": dict(data=4, context=2)},
    "tf_scm": {"context4_fsdp2": dict(context=4, fsdp=2)},
    "sf_dmd": {"data4_context2": dict(data=4, context=2)},
}
Q_KERNEL = ("params", "blocks_0", "attn1", "to_q", "kernel")   # [D, D]: (embed -> fsdp, heads -> tensor)


def _config(path="configs/toy/teacher.py", arg="runlocal"):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


# ------------------------------------------------------------------------------------------ the subprocess
def _run_scenarios(tmp: str) -> dict:
  import jax
  import jax.numpy as jnp
  from rcm_jax import parallel, recipes
  from rcm_jax.training import checkpoint, optim, setup, trainer
  from rcm_jax.training.state import TrainState

  devices = jax.devices()
  assert len(devices) == 8, devices
  cfg = _config()
  cfg.train.batch_size = 8
  cfg.optim.warmup_steps = 0
  world = setup.make_world(cfg)
  batch = setup.first_batch(cfg, world, setup.ensure_data(cfg, world, os.path.join(tmp, "data"), split="train"))
  model = setup.make_model(cfg, world)
  tx = optim.make_optimizer(cfg.optim)
  out = {}

  def get(tree, path):
    for k in path:
      tree = tree[k]
    return tree

  def two_steps(recipe, state0, frozen, mesh, devs):
    cfg.mesh = dict(mesh)
    plan = parallel.plan_from_config(cfg, devs)
    state = parallel.place(plan, state0)
    update = parallel.jit_update(plan, trainer.make_update(recipe, tx, cfg), state, donate=False)
    fz = parallel.place(plan, frozen)
    losses = []
    for i in range(2):
      state, m = update(state, fz, parallel.global_batch(plan, batch), jax.random.key(10 + i))
      losses.append(float(m["loss"]))
    q = get(state.params, Q_KERNEL)
    opt_specs = sorted({str(s.spec) for s in jax.tree.leaves(
        jax.tree.map(lambda x: x.sharding, state.opt_state)) if hasattr(s, "spec")})
    return state, {"losses": losses, "q_spec": str(q.sharding.spec), "q_shards": len(q.addressable_shards),
                   "q_shard_shape": list(q.addressable_shards[0].data.shape),
                   "opt_specs": opt_specs, "ema_spec": str(get(state.ema, Q_KERNEL).sharding.spec)}

  def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves((state.params, state.ema, state.opt_state))]

  def compare(ref, got):
    return max(float(np.max(np.abs(a - b))) for a, b in zip(ref, got))

  # --- RF teacher: one device vs each mesh
  rf = recipes.get_recipe("rf")(cfg, model)
  state0 = TrainState.create(rf.init_params(jax.random.key(0), batch), tx, use_ema=True)
  ref_state, ref = two_steps(rf, state0, {}, dict(data=1), devices[:1])
  ref_leaves = leaves(ref_state)
  out["rf/one_device"] = ref
  states = {}
  for name, mesh in MESHES.items():
    st, res = two_steps(rf, state0, {}, mesh, devices)
    res["max_param_diff"] = compare(ref_leaves, leaves(st))
    out[f"rf/{name}"] = res
    states[name] = st

  # --- a checkpoint saved under fsdp=8 restores under data=2 x fsdp=2 x tensor=2 and on one device
  mngr = checkpoint.manager(os.path.join(tmp, "ckpt"), keep=2, save_every=1)
  checkpoint.save(mngr, 2, states["fsdp8"], force=True)
  mngr.wait_until_finished()
  for name, mesh, devs in (("data2_fsdp2_tensor2", TF_MESHES["data2_fsdp2_tensor2"], devices),
                           ("one_device", dict(data=1), devices[:1])):
    cfg.mesh = dict(mesh)
    plan = parallel.plan_from_config(cfg, devs)
    target = parallel.place(plan, state0)
    restored, step = checkpoint.restore(mngr, target)
    want = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, target))
    got = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, restored))
    out[f"ckpt/{name}"] = {"step": step, "max_diff": compare(leaves(states["fsdp8"]), leaves(restored)),
                           "shardings_match": all(a == b for a, b in zip(want, got)),
                           "q_spec": str(get(restored.params, Q_KERNEL).sharding.spec)}
  mngr.close()

  # --- TF diffusion (teacher forcing: packed sequence, block mask) on the causal toy layout
  tcfg = _config()
  tcfg.train.batch_size, tcfg.optim.warmup_steps = 8, 0
  for recipe_name in ("tf",):
    tcfg.recipe = recipe_name
    params = rf.init_params(jax.random.key(1), batch)
    recipe = recipes.get_recipe(recipe_name)(tcfg, model)
    frozen = recipe.frozen_params()
    s0 = TrainState.create(params, tx, use_ema=True)
    ref_state, ref = two_steps(recipe, s0, frozen, dict(data=1), devices[:1])
    ref_leaves = leaves(ref_state)
    out[f"{recipe_name}/one_device"] = ref
    for name, mesh in TF_MESHES.items():
      st, res = two_steps(recipe, s0, frozen, mesh, devices)
      res["max_param_diff"] = compare(ref_leaves, leaves(st))
      out[f"{recipe_name}/{name}"] = res

  # --- the trainer itself: 2 steps under fsdp=8, resumed to 3 under data=2 x fsdp=2 x tensor=2
  workdir = os.path.join(tmp, "train")
  run = []
  for steps, mesh in ((2, dict(fsdp=8)), (3, TF_MESHES["data2_fsdp2_tensor2"])):
    c = _trainer_config(steps)
    c.mesh.update(dict(dict(data=1, fsdp=1, context=1, tensor=1), **mesh))
    run.append(trainer.train(c, workdir, data_root=os.path.join(tmp, "data")))
  out["trainer"] = {"final_loss": run[-1]["final_loss"], "step": run[-1]["step"]}

  # --- parallel.build: a state computed straight onto fsdp=8 from params committed to one device
  cfg.mesh = dict(data=1, fsdp=8, context=1, tensor=1)
  one = jax.device_put(rf.init_params(jax.random.key(0), batch), devices[0])
  create = lambda p: TrainState.create(p, tx, use_ema=True)
  built = parallel.build(parallel.plan_from_config(cfg, devices), create, one)
  q = get(built.params, Q_KERNEL)
  out["build"] = {"max_diff": compare(leaves(create(one)), leaves(built)), "q_spec": str(q.sharding.spec),
                  "q_shards": len(q.addressable_shards), "ema_spec": str(get(built.ema, Q_KERNEL).sharding.spec),
                  "opt_specs": sorted({str(x.sharding.spec) for x in jax.tree.leaves(built.opt_state)})}
  return out


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves((state.params, state.ema, state.opt_state, state.extra))]


def _max_diff(ref, got):
  return max(float(np.max(np.abs(a - b))) for a, b in zip(ref, got))


def _perturbed(params, seed, scale=0.05):
  """Trained-looking params: every leaf (zero-initialised output heads too) plus fresh noise."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [l + scale * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)])


def _run_cp_scenarios(tmp: str, slow: bool = False) -> dict:
  """Context parallelism on 8 devices: recipe steps, the model JVP, a KV-cache rollout and the mesh errors
  (slow: the second group of recipe meshes only)."""
  import time
  import jax.numpy as jnp
  from rcm_jax import parallel, recipes
  from rcm_jax.errors import UserError
  from rcm_jax.inference import rollout
  from rcm_jax.models import build_model, masks
  from rcm_jax.recipes.causal import BlockPattern
  from rcm_jax.training import optim, setup, trainer

  devices = jax.devices()
  assert len(devices) == 8, devices
  out = {}
  cfg = _config("configs/toy/causal.py")
  cfg.model.num_heads = 4                 # dim 48 -> head_dim 12: context 4 divides the heads
  cfg.train.batch_size, cfg.optim.warmup_steps, cfg.diffusion.p_uncond = 8, 0, 0.1
  cfg.causal.first_chunk_frames, cfg.causal.chunk_frames = 2, 2
  cfg.scm.warmup_steps = 2
  world = setup.make_world(cfg)
  batch = setup.first_batch(cfg, world, setup.ensure_data(cfg, world, os.path.join(tmp, "data"), split="train"))
  model = setup.make_model(cfg, world)
  tx = optim.make_optimizer(cfg.optim)
  base = recipes.get_recipe("rf")(cfg, model).init_params(jax.random.key(0), batch)
  teacher = _perturbed(base, 1)
  student = _perturbed(base, 2)

  def steps(recipe, mesh, devs, n=2):
    cfg.mesh = dict(mesh)
    plan = parallel.plan_from_config(cfg, devs)
    state = trainer.build_state(plan, recipe, tx, student, jax.random.key(3), use_ema=True)
    fn = recipe.update if hasattr(recipe, "update") else trainer.make_update(recipe, tx, cfg)
    update = parallel.jit_update(plan, fn, state, donate=False)
    frozen = parallel.place(plan, recipe.frozen_params())
    losses = []
    for i in range(n):
      state, m = update(state, frozen, parallel.global_batch(plan, batch), jax.random.key(10 + i))
      losses.append(float(m["loss"]))
    return _leaves(state), losses

  timings = out["seconds"] = {}
  for name, meshes in (CP_MESHES_SLOW if slow else CP_MESHES).items():
    t0 = time.perf_counter()
    cfg.recipe = name
    if name == "sf_dmd":   # 2 chunks of 4 frames, 2-step schedule, one critic update: a small rollout
      cfg.causal.first_chunk_frames, cfg.causal.chunk_frames = 4, 4
      cfg.teacher.kind = "bidirectional"
      cfg.dmd = dict(schedule=(0.999, 0.5, 0.0), critic_steps=1, time_shift=5.0, noisy_context=False,
                     cache_keys="post_rope", cache_frames=0, replay_backprop=False)
      cfg.optim_critic = dict(lr=1e-3, b1=0.0, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0)
    recipe = recipes.get_recipe(name)(cfg, model, teacher_params=teacher) if name != "tf" else \
        recipes.get_recipe(name)(cfg, model)
    ref_leaves, ref_losses = steps(recipe, dict(data=1), devices[:1])
    out[f"{name}/one_device"] = {"losses": ref_losses}
    for mname, mesh in meshes.items():
      got_leaves, losses = steps(recipe, mesh, devices)
      out[f"{name}/{mname}"] = {"losses": losses, "max_param_diff": _max_diff(ref_leaves, got_leaves)}
    timings[name] = round(time.perf_counter() - t0, 1)
  if slow:
    return out

  t0 = time.perf_counter()

  # --- jax.jvp through the whole model (Pallas flash kernel, fused JVP rule; interpret mode on CPU), block-causal
  pm = build_model("tiny", num_heads=4, num_layers=1, attention_impl="pallas")
  x = jax.random.normal(jax.random.key(4), (2, 4, 8, 8, 4))          # 4 frames x 16 tokens
  t = jax.random.uniform(jax.random.key(5), (2, 4))
  pp = _perturbed(pm.init(jax.random.key(6), x, t), 7)
  mask = masks.block_causal(4, 16, first_chunk_frames=1, chunk_frames=1)
  tangents = (jax.random.normal(jax.random.key(8), x.shape), jnp.ones_like(t))
  jvp = lambda p, x, t: jax.jvp(lambda x, t: pm.apply(p, x, t, mask=mask), (x, t), tangents)
  ref = jax.jit(jvp)(pp, x, t)
  cfg.mesh = dict(data=2, context=4)
  plan = parallel.plan_from_config(cfg)
  fn = parallel.jit_activated(plan, jvp)
  got = fn(pp, x, t)
  hlo = fn.lower(pp, x, t).as_text()
  out["jvp/pallas_data2_context4"] = {"out_diff": float(jnp.max(jnp.abs(got[0] - ref[0]))),
                                      "tangent_diff": float(jnp.max(jnp.abs(got[1] - ref[1]))),
                                      "tangent_scale": float(jnp.max(jnp.abs(ref[1]))),
                                      "all_to_all": hlo.count("all_to_all")}
  # the same without a context axis: the kernel (a custom call on GPU, which GSPMD would run whole on every
  # device) runs inside a shard_map on each device's batch / head shard
  cfg.mesh = dict(data=2, tensor=4)
  plan = parallel.plan_from_config(cfg)
  fn = parallel.jit_activated(plan, jvp)
  got = fn(pp, x, t)
  with parallel.activate(plan):
    jaxpr = str(jax.make_jaxpr(jvp)(pp, x, t))
  out["jvp/pallas_data2_tensor4"] = {"out_diff": float(jnp.max(jnp.abs(got[0] - ref[0]))),
                                     "tangent_diff": float(jnp.max(jnp.abs(got[1] - ref[1]))),
                                     "tangent_scale": float(jnp.max(jnp.abs(ref[1]))),
                                     "shard_map": jaxpr.count("shard_map"),
                                     "all_to_all": fn.lower(pp, x, t).as_text().count("all_to_all")}
  timings["jvp"] = round(time.perf_counter() - t0, 1)
  t0 = time.perf_counter()

  # --- one rollout chunk pair on a KV cache split along the sequence (context) vs unsplit
  rm = build_model("tiny", num_heads=4, num_layers=2, num_classes=3)
  noise = jax.random.normal(jax.random.key(9), (2, 2, 8, 8, 4))
  cond = {"labels": jnp.asarray([[1], [2]], jnp.int32)}
  rp = _perturbed(rm.init(jax.random.key(10), noise, jnp.zeros((2, 2)), labels=cond["labels"]), 11)
  rplan = rollout.make_plan(BlockPattern(1, 1), 2, 0)
  sched = rollout.schedules_for(rplan, "consistency", 2)
  cache0 = rollout.init_cache(rm, rplan, 2, 16)

  def two_chunks(params, noise, cache):
    outs = list(rollout.rollout_chunks(rm, params, noise, cond, plan=rplan, schedules=sched, cache=cache,
                                       rng=jax.random.key(12)))
    return jnp.concatenate([o[1] for o in outs], axis=1), outs[-1][2]

  ref_x, ref_cache = jax.jit(two_chunks)(rp, noise, cache0)
  cfg.mesh = dict(data=2, context=4)
  plan = parallel.plan_from_config(cfg)
  cache_sh = parallel.kv_cache_shardings(plan, cache0)
  cache = jax.device_put(cache0, cache_sh)
  fn = parallel.jit_activated(plan, two_chunks, out_shardings=(None, cache_sh))
  got_x, got_cache = fn(rp, noise, cache)
  out["rollout/data2_context4"] = {
      "x_diff": float(jnp.max(jnp.abs(got_x - ref_x))),
      "cache_diff": max(float(jnp.max(jnp.abs(got_cache[k] - ref_cache[k]))) for k in ("k", "v")),
      "cache_spec": str(cache["k"].sharding.spec), "out_cache_spec": str(got_cache["k"].sharding.spec),
      "cache_shape": list(cache0["k"].shape), "cache_shard_shape": list(got_cache["k"].addressable_shards[0].data.shape),
      "cache_written": float(jnp.max(jnp.abs(ref_cache["k"])))}
  timings["rollout"] = round(time.perf_counter() - t0, 1)

  # --- bad meshes: errors before compilation, naming the numbers
  errors = {}
  def error_of(fn):
    try:
      fn()
    except UserError as e:
      return str(e)
    return None
  small = build_model("tiny", num_heads=4, num_layers=1)
  x9 = jnp.zeros((2, 1, 6, 6, 4))                                   # 1 frame of 3 x 3 = 9 tokens
  p9 = small.init(jax.random.key(0), x9, jnp.zeros((2, 1)))
  for name, mesh, xin in (("seq9_context2", dict(data=4, context=2), x9),
                          ("heads4_context8", dict(context=8), jnp.zeros((2, 1, 8, 8, 4)))):
    cfg.mesh = dict(mesh)
    plan = parallel.plan_from_config(cfg)
    errors[name] = error_of(lambda: parallel.jit_activated(plan, small.apply).lower(p9, xin, jnp.zeros((2, 1))))
  bad = _config()                                                      # 2 heads, 128 tokens
  bad.mesh = dict(data=2, context=4)
  errors["validate_heads2_context4"] = error_of(lambda: setup.validate(bad))
  out["errors"] = errors
  return out


def _trainer_config(steps):
  c = _config()
  c.train.batch_size, c.train.num_steps, c.train.sample_at_end, c.train.progress = 8, steps, False, False
  return c


@functools.lru_cache(maxsize=2)
def _results(tmp: str, mode: str = "mesh") -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), tmp, mode], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")][-1]
  return json.loads(line[len("RESULTS "):])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("parallel"))
  return dict(_results(tmp), tmp=tmp)


@pytest.fixture(scope="module")
def cp(tmp_path_factory):
  return _results(str(tmp_path_factory.mktemp("context")), "cp")


@pytest.fixture(scope="module")
def cp_slow(tmp_path_factory):
  return _results(str(tmp_path_factory.mktemp("context_slow")), "cp_slow")


# ------------------------------------------------------------------------------------------ mesh scenarios
@pytest.mark.parametrize("name", list(MESHES))
def test_rf_step_under_a_mesh_matches_one_device(results, name):
  ref, got = results["rf/one_device"], results[f"rf/{name}"]
  np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
  assert got["max_param_diff"] < 1e-5, got


def test_params_ema_and_optimizer_state_are_split_as_the_rules_say(results):
  assert results["rf/one_device"]["q_shards"] == 1
  fsdp = results["rf/fsdp8"]
  assert fsdp["q_spec"] == "P('fsdp', None)" and fsdp["q_shard_shape"] == [6, 48]
  assert fsdp["ema_spec"] == fsdp["q_spec"]
  assert "P('fsdp', None)" in fsdp["opt_specs"]          # Adam moments follow the params
  assert results["rf/data8"]["q_spec"] == "P(None, None)"  # pure data parallelism: replicated
  tp = results["tf/data2_fsdp2_tensor2"]
  assert tp["q_spec"] == "P('fsdp', 'tensor')" and tp["q_shard_shape"] == [24, 24]
  assert results["rf/data4_tensor2"]["q_spec"] == "P(None, 'tensor')"


@pytest.mark.parametrize("recipe", ["tf"])
@pytest.mark.parametrize("name", list(TF_MESHES))
def test_tf_recipes_under_a_mesh_match_one_device(results, recipe, name):
  ref, got = results[f"{recipe}/one_device"], results[f"{recipe}/{name}"]
  np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-4, atol=1e-5)
  assert got["max_param_diff"] < 1e-4, got


def test_state_built_onto_the_mesh_from_one_device_params(results):
  """parallel.build: the state built eagerly, but already split as the rules say (params, Adam, EMA)."""
  r = results["build"]
  assert r["max_diff"] == 0.0
  assert r["q_spec"] == r["ema_spec"] == "P('fsdp', None)" and r["q_shards"] == 8
  assert "P('fsdp', None)" in r["opt_specs"], r["opt_specs"]          # Adam moments follow the params


@pytest.mark.parametrize("name", ["data2_fsdp2_tensor2", "one_device"])
def test_checkpoint_saved_under_one_mesh_restores_under_another(results, name):
  r = results[f"ckpt/{name}"]
  assert r["step"] == 2 and r["max_diff"] == 0.0 and r["shardings_match"], r


def test_trainer_on_a_mesh_resumed_on_another_matches_one_device(results, tmp_path):
  from rcm_jax.training import trainer
  one = trainer.train(_trainer_config(3), str(tmp_path / "one"), data_root=str(tmp_path / "data"))
  assert results["trainer"]["step"] == 3
  np.testing.assert_allclose(results["trainer"]["final_loss"], one["final_loss"], rtol=1e-4)


def test_params_saved_sharded_over_8_devices_load_on_one(results):
  from rcm_jax.training import checkpoint   # init_from / teacher_from read checkpoints of any mesh
  params, step = checkpoint.load_params(os.path.join(results["tmp"], "train"))
  leaves = jax.tree.leaves(params)
  assert step == 3 and len(leaves) > 10 and all(np.isfinite(np.asarray(x)).all() for x in leaves)


# ------------------------------------------------------------------------------------------ context parallelism
def _check_cp_step(res, recipe, name):
  ref, got = res[f"{recipe}/one_device"], res[f"{recipe}/{name}"]
  assert all(np.isfinite(ref["losses"])) and ref["losses"][0] != 0.0
  np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-4, atol=1e-5)
  assert got["max_param_diff"] < 1e-4, got   # params, EMA, Adam moments (and SF-DMD's critic) after 2 steps


@pytest.mark.parametrize("recipe,name", [(r, m) for r, ms in CP_MESHES.items() for m in ms])
def test_recipe_steps_with_context_parallelism_match_one_device(cp, recipe, name):
  _check_cp_step(cp, recipe, name)


@pytest.mark.slow
@pytest.mark.parametrize("recipe,name", [(r, m) for r, ms in CP_MESHES_SLOW.items() for m in ms])
def test_more_recipe_steps_with_context_parallelism_match_one_device(cp_slow, recipe, name):
  _check_cp_step(cp_slow, recipe, name)


def test_jvp_through_the_model_with_context_parallelism_matches_one_device(cp):
  r = cp["jvp/pallas_data2_context4"]
  assert r["all_to_all"] >= 4, r                       # the exchange is there (q, k, v, out per layer)
  assert r["out_diff"] < 1e-5 and r["tangent_diff"] < 1e-5 * max(1.0, r["tangent_scale"]), r


def test_pallas_kernel_runs_per_shard_under_a_mesh_without_context(cp):
  r = cp["jvp/pallas_data2_tensor4"]
  assert r["shard_map"] >= 1 and r["all_to_all"] == 0, r    # split by hand, no sequence exchange
  assert r["out_diff"] < 1e-5 and r["tangent_diff"] < 1e-5 * max(1.0, r["tangent_scale"]), r


def test_rollout_on_a_sequence_sharded_kv_cache_matches_unsharded(cp):
  r = cp["rollout/data2_context4"]
  # [layers, B, S, H, Dh]: batch over data (2), the cache's sequence over context (4)
  assert r["cache_spec"] == "P(None, 'data', 'context', None, None)" == r["out_cache_spec"], r
  layers, b, s, h, dh = r["cache_shape"]
  assert s >= 16 and r["cache_shard_shape"] == [layers, b // 2, s // 4, h, dh], r
  assert r["cache_written"] > 0 and r["x_diff"] < 1e-5 and r["cache_diff"] < 1e-5, r


def test_context_axis_that_does_not_divide_the_sequence_or_heads_fails_before_compiling(cp):
  e = cp["errors"]
  assert "config.mesh.context=2 does not divide the sequence of 9 tokens" in e["seq9_context2"], e
  assert "config.mesh.context=8 does not divide model.num_heads=4" in e["heads4_context8"], e
  assert "config.mesh.context=4 does not divide model.num_heads=2" in e["validate_heads2_context4"], e


# ------------------------------------------------------------------------------------------ errors, in-process
def test_configure_jax_sets_the_flags_the_kernel_needs_under_a_mesh():
  from rcm_jax.training import setup
  names = ("jax_use_simplified_jaxpr_constants", "jax_remat3")
  before = {n: getattr(jax.config, n) for n in names}
  try:
    cfg = _config("configs/toy/causal.py")
    cfg.model.attention_impl = "pallas"
    cfg.mesh = dict(data=1, fsdp=1, context=1, tensor=1)
    jax.config.update(names[0], False)
    setup.configure_jax(cfg)
    assert jax.config.jax_remat3 and not jax.config.jax_use_simplified_jaxpr_constants   # one device: unchanged
    cfg.mesh = dict(data=1, fsdp=2, context=1, tensor=1)
    setup.configure_jax(cfg)
    assert jax.config.jax_use_simplified_jaxpr_constants   # jax 0.11.2's shard_map-in-scan workaround
  finally:
    for n, v in before.items():
      jax.config.update(n, v)


def test_mesh_shape_resolves_minus_one_and_names_the_numbers():
  from rcm_jax.parallel import mesh as mesh_lib
  assert mesh_lib.resolve_shape(dict(data=-1, fsdp=4), 8) == dict(data=2, fsdp=4, context=1, tensor=1)
  assert mesh_lib.resolve_shape({}, 8) == dict(data=8, fsdp=1, context=1, tensor=1)
  with pytest.raises(mesh_lib.MeshError, match=r"has 6 devices but there are 8"):
    mesh_lib.resolve_shape(dict(data=3, fsdp=2), 8)
  with pytest.raises(mesh_lib.MeshError, match=r"take 3 devices, which does not divide the 8"):
    mesh_lib.resolve_shape(dict(data=-1, fsdp=3), 8)
  with pytest.raises(mesh_lib.MeshError, match=r"only one axis may be -1"):
    mesh_lib.resolve_shape(dict(data=-1, fsdp=-1), 8)
  with pytest.raises(mesh_lib.MeshError, match=r"unknown axes \['sequence'\]"):
    mesh_lib.resolve_shape(dict(sequence=2), 8)
  with pytest.raises(mesh_lib.MeshError, match=r"config.mesh.tensor=0"):
    mesh_lib.resolve_shape(dict(tensor=0), 8)


def test_batch_and_context_checks_name_the_numbers():
  from rcm_jax.parallel import mesh as mesh_lib
  sizes = dict(data=2, fsdp=4, context=1, tensor=1)
  mesh_lib.check_batch(16, sizes, grad_accum=2)
  with pytest.raises(mesh_lib.MeshError, match=r"batch_size=12 .*data=2 x fsdp=4 = 8"):
    mesh_lib.check_batch(12, sizes)
  with pytest.raises(mesh_lib.MeshError, match=r"grad_accum=4 = 4 examples per micro-batch.* = 8"):
    mesh_lib.check_batch(16, sizes, grad_accum=4)
  with pytest.raises(mesh_lib.MeshError, match=r"context=3 does not divide the sequence of 128 tokens"):
    mesh_lib.check_context(dict(context=3), num_tokens=128, num_heads=3)
  with pytest.raises(mesh_lib.MeshError, match=r"context=4 does not divide model.num_heads=2"):
    mesh_lib.check_context(dict(context=4), num_tokens=128, num_heads=2)


def test_training_config_with_a_bad_mesh_fails_validation_before_any_compute():
  from rcm_jax.errors import UserError
  from rcm_jax.training import setup
  cfg = _config()
  setup.validate(cfg)   # the default mesh: every device on `data`
  cfg.mesh.data = 2     # one CPU device here
  with pytest.raises(UserError, match=r"config.mesh .* has 2 devices but there are 1"):
    setup.validate(cfg)
  cfg.mesh.data, cfg.mesh.context = -1, 3
  with pytest.raises(UserError, match=r"take 3 devices"):
    setup.validate(cfg)


def test_rules_parse_and_reject_unknown_mesh_axes():
  from rcm_jax.parallel import sharding
  rules = sharding.parse_rules(dict(mlp="", batch="data,fsdp"))
  assert rules["mlp"] == () and rules["batch"] == ("data", "fsdp") and rules["embed"] == ("fsdp",)
  with pytest.raises(sharding.ShardingError, match=r"config.sharding_rules.embed='model'"):
    sharding.parse_rules(dict(embed="model"))


def test_param_logical_axes_from_path_and_shape():
  from rcm_jax.parallel.sharding import param_logical_axes as axes
  assert axes(["params", "blocks_0", "attn1", "to_q", "kernel"], (48, 48)) == ("embed", "heads")
  assert axes(["params", "blocks_0", "ffn", "net_2", "kernel"], (96, 48)) == ("mlp", "embed")
  assert axes(["params", "blocks", "ffn", "net_0", "proj", "kernel"], (2, 48, 96)) == ("layers", "embed", "mlp")
  assert axes(["params", "proj_out", "kernel"], (48, 64)) == (None, "embed")
  assert axes(["params", "patch_embedding", "kernel"], (1, 8, 8, 1, 48)) == (None,) * 4 + ("embed",)
  assert axes(["params", "proj_out", "bias"], (64,)) == (None,)
  assert axes(["params", "blocks_0", "scale_shift_table"], (1, 6, 48)) == (None, None, None)
  assert axes(["count"], ()) == ()


def test_distributed_init_args_from_the_environment():
  from rcm_jax.parallel import distributed
  assert distributed.init_args({}) is None
  assert distributed.init_args({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
  assert distributed.init_args({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == {}
  assert distributed.init_args({"JAX_COORDINATOR_ADDRESS": "h:1234", "NUM_PROCESSES": "2", "PROCESS_ID": "1"}) \
      == dict(coordinator_address="h:1234", num_processes=2, process_id=1)
  with pytest.raises(distributed.DistributedError, match=r"\['PROCESS_ID'\]"):
    distributed.init_args({"COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "2"})
  with pytest.raises(distributed.DistributedError, match=r"PROCESS_ID=2 must lie in \[0, NUM_PROCESSES=2\)"):
    distributed.init_args({"COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "2", "PROCESS_ID": "2"})


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  mode = sys.argv[2] if len(sys.argv) > 2 else "mesh"
  if mode == "mesh":
    res = _run_scenarios(sys.argv[1])
  else:
    res = _run_cp_scenarios(sys.argv[1], slow=mode == "cp_slow")
  print("RESULTS " + json.dumps(res), flush=True)
