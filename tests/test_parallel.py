"""Sharded training on 8 fake CPU devices: meshes give the single-device step, checkpoints cross meshes.

JAX fixes its device count at import, and the pytest worker has already imported it with one device, so the
mesh scenarios run in a subprocess: this file run as a script with XLA_FLAGS forcing 8 host devices, which
prints one JSON line of results that the tests below check. Mesh / batch / rules errors are pure functions
and are tested in-process.
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
# Every mesh costs one compilation of the update (~10 s on 2 shared cores): the four for the RF teacher,
# one mixed mesh for TF diffusion.
MESHES = {"data8": dict(data=8), "data2_fsdp4": dict(data=2, fsdp=4), "fsdp8": dict(fsdp=8),
          "data4_tensor2": dict(data=4, tensor=2)}
TF_MESHES = {"data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2)}
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
  return out


def _trainer_config(steps):
  c = _config()
  c.train.batch_size, c.train.num_steps, c.train.sample_at_end, c.train.progress = 8, steps, False, False
  return c


@functools.lru_cache(maxsize=1)
def _results(tmp: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), tmp], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")][-1]
  return json.loads(line[len("RESULTS "):])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("parallel"))
  return dict(_results(tmp), tmp=tmp)


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


# ------------------------------------------------------------------------------------------ errors, in-process
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
  print("RESULTS " + json.dumps(_run_scenarios(sys.argv[1])), flush=True)
