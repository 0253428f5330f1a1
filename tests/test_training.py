"""The trainer, the CLI and the recipe runner on the runlocal toy configs (tiny model, a few steps)."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rcm_jax.errors import UserError
from rcm_jax.training import checkpoint, ema, trainer, writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(path="configs/toy/teacher.py", arg="runlocal"):
  from ml_collections import config_flags  # noqa: F401
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _cli(*args, workdir, env_extra=None, **popen):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **(env_extra or {}))
  cmd = [sys.executable, "-m", "rcm_jax.main", *args, f"--workdir={workdir}"]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          **popen)


def test_power_ema_gamma_matches_its_defining_equation():
  for std in np.random.default_rng().uniform(0.01, 0.25, 5):
    g = ema.std_to_gamma(float(std))
    assert g > 0
    np.testing.assert_allclose((g + 1) / ((g + 2) ** 2 * (g + 3)), std ** 2, rtol=1e-6)
  with pytest.raises(ValueError, match="ema.std"):
    ema.std_to_gamma(0.5)


def test_power_ema_is_the_running_mean_at_gamma_zero():
  # gamma = 0 gives beta_t = 1 - 1/t: the EMA is then the plain average of all iterates.
  cfg = ml_collections.ConfigDict(dict(kind="power", std=0.2886751))  # sqrt(1/12) <=> gamma = 0
  assert abs(ema.std_to_gamma(cfg.std)) < 1e-4
  xs = np.random.default_rng().normal(size=(7, 3))
  e = jnp.asarray(xs[0])
  for t in range(2, 8):
    e = ema.update(e, jnp.asarray(xs[t - 1]), ema.ema_decay(cfg, t))
  np.testing.assert_allclose(e, xs.mean(0), rtol=1e-3)


def test_bfloat16_first_moment_halves_its_memory_and_follows_float32():
  """optim.mu_dtype=bfloat16: Adam's first moment is stored in bf16 (the second stays fp32), and three updates
  of random params and gradients stay within bf16 rounding of the fp32 optimizer's."""
  import ml_collections
  import optax
  from rcm_jax.training import optim
  rng = np.random.default_rng()
  cfg = dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, warmup_steps=0, clip_norm=0.0)
  params = {"w": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)}
  txs = {d: optim.make_optimizer(ml_collections.ConfigDict(dict(cfg, mu_dtype=d))) for d in ("float32", "bfloat16")}
  states = {d: tx.init(params) for d, tx in txs.items()}
  adam = {d: st[0] for d, st in states.items()}   # adamw = chain(scale_by_adam, weight decay, lr)
  assert adam["bfloat16"].mu["w"].dtype == jnp.bfloat16 and adam["bfloat16"].nu["w"].dtype == jnp.float32
  assert adam["float32"].mu["w"].dtype == jnp.float32
  ps = dict.fromkeys(txs, params)
  for _ in range(3):
    g = {"w": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)}
    for d, tx in txs.items():
      upd, states[d] = tx.update(g, states[d], ps[d])
      ps[d] = optax.apply_updates(ps[d], upd)
  np.testing.assert_allclose(ps["bfloat16"]["w"], ps["float32"]["w"], rtol=0, atol=3e-4)
  assert float(jnp.max(jnp.abs(ps["float32"]["w"] - params["w"]))) > 1e-2   # the updates moved the params


def test_train_step_skips_non_finite_updates_and_counts_them(tmp_path):
  cfg = _config()
  cfg.optim.warmup_steps = 0   # the warm-up starts at lr 0: the first update would change nothing
  from rcm_jax import recipes
  from rcm_jax.training import optim, setup
  from rcm_jax.training.state import TrainState
  world = setup.make_world(cfg)
  path = setup.ensure_data(cfg, world, str(tmp_path / "data"), split="train")
  batch = setup.first_batch(cfg, world, path)
  model = setup.make_model(cfg)
  recipe = recipes.get_recipe("rf")(cfg, model)
  tx = optim.make_optimizer(cfg.optim)
  state = TrainState.create(recipe.init_params(jax.random.key(0), batch), tx, use_ema=True)
  update = jax.jit(trainer.make_update(recipe, tx, cfg))
  s1, m1 = update(state, {}, batch, jax.random.key(1))
  assert m1["skipped"] == 0 and int(s1.nan_streak) == 0 and int(s1.step) == 1
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), s1.params, state.params)
  assert any(jax.tree.leaves(changed))
  bad = dict(batch, video=batch["video"] * np.nan)
  s2, m2 = update(s1, {}, bad, jax.random.key(2))
  assert m2["skipped"] == 1 and int(s2.nan_streak) == 1 and int(s2.nan_total) == 1 and int(s2.step) == 2
  for a, b in zip(jax.tree.leaves(s2.params), jax.tree.leaves(s1.params)):
    np.testing.assert_array_equal(a, b)
  s3, _ = update(s2, {}, batch, jax.random.key(3))
  assert int(s3.nan_streak) == 0 and int(s3.nan_total) == 1


def test_grad_accumulation_matches_the_full_batch(tmp_path):
  import optax
  from rcm_jax import recipes
  from rcm_jax.diffusion import flow
  from rcm_jax.training import setup
  from rcm_jax.training.state import TrainState
  cfg = _config()
  world = setup.make_world(cfg)
  path = setup.ensure_data(cfg, world, str(tmp_path / "data"), split="train")
  batch = setup.first_batch(cfg, world, path)
  model = setup.make_model(cfg)

  class Deterministic(recipes.Recipe):
    # noise and time are functions of each sample, so splitting the batch cannot change the mean loss
    def loss(self, params, frozen, batch, rng, step):
      x0 = batch["video"]
      eps = jnp.sin(37.0 * x0 + 1.0)
      t = jnp.broadcast_to(0.5 + 0.4 * jnp.tanh(x0.mean(axis=(2, 3, 4))), x0.shape[:2])
      v = self.velocity(params, flow.interpolate(x0, eps, t), t, batch["cond"])
      loss = jnp.mean((v - (eps - x0)) ** 2)
      return loss, {"loss": loss}

  recipe = Deterministic(cfg, model)
  params = recipe.init_params(jax.random.key(0), batch)
  tx = optax.sgd(1.0)
  deltas = {}
  for accum in (1, 2, 4):
    cfg.train.grad_accum = accum
    state = TrainState.create(params, tx, use_ema=False)
    s, m = jax.jit(trainer.make_update(recipe, tx, cfg))(state, {}, batch, jax.random.key(1))
    deltas[accum] = jax.tree.map(lambda a, b: a - b, state.params, s.params)
  for accum in (2, 4):
    for a, b in zip(jax.tree.leaves(deltas[1]), jax.tree.leaves(deltas[accum])):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_workdir_of_another_config_is_refused_and_left_intact(tmp_path):
  cfg = _config()
  checkpoint.guard_workdir(cfg, str(tmp_path))
  before = (tmp_path / "config.json").read_text()
  other = _config()
  other.model.dtype = "bfloat16"
  with pytest.raises(UserError, match="model.dtype"):
    checkpoint.guard_workdir(other, str(tmp_path))
  assert (tmp_path / "config.json").read_text() == before
  longer = _config()
  longer.train.num_steps = 100   # resumable keys may change
  checkpoint.guard_workdir(longer, str(tmp_path))
  # A workdir written before optim.mu_dtype existed ran with its default: it resumes, another value does not.
  import json
  old = json.loads((tmp_path / "config.json").read_text())
  del old["optim"]["mu_dtype"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  checkpoint.guard_workdir(_config(), str(tmp_path))
  half = _config()
  half.optim.mu_dtype = "bfloat16"
  with pytest.raises(UserError, match="optim.mu_dtype"):
    checkpoint.guard_workdir(half, str(tmp_path))


@pytest.mark.parametrize("key,value,match", [
    ("recipe", "nope", "recipe"),
    ("world", "mars", "mars"),
    ("train.grad_accum", 3, "grad_accum"),
    ("ema.kind", "fancy", "ema.kind"),
    ("model.attention_impl", "magic", "attention_impl"),
    ("optim.mu_dtype", "float8", "optim.mu_dtype"),
])
def test_bad_configs_stop_before_compute_naming_the_key(key, value, match):
  from rcm_jax.training import setup
  cfg = _config()
  *parents, leaf = key.split(".")
  node = cfg
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=match):
    setup.validate(cfg)


def test_cli_reports_user_errors_without_traceback(tmp_path):
  p = _cli("train", "--config=configs/toy/teacher.py:runlocal", "--config.recipe=nope", workdir=str(tmp_path))
  out, _ = p.communicate(timeout=120)
  assert p.returncode != 0
  assert "Unknown recipe 'nope'" in out and "Traceback" not in out


def test_sigkill_and_resume_reproduces_the_unbroken_losses(tmp_path):
  args = ["train", "--config=configs/toy/teacher.py:runlocal", "--config.train.num_steps=10",
          "--config.train.ckpt_every=3", "--config.train.sample_at_end=False", "--config.train.progress=False"]
  unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
  p = _cli(*args, workdir=str(unbroken))
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 0, out
  # kill -9 once step 7 is logged (after the step-6 checkpoint), then resume with the same command
  p = _cli(*args, workdir=str(broken), start_new_session=True)
  deadline = time.time() + 300
  while time.time() < deadline and max(writer.read_losses(str(broken)), default=0) < 7:
    time.sleep(0.05)
  os.killpg(p.pid, signal.SIGKILL)
  p.wait()
  killed_at = max(writer.read_losses(str(broken)))
  assert killed_at < 10, "the run finished before it could be killed"
  p = _cli(*args, workdir=str(broken))
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 0, out
  a, b = writer.read_losses(str(unbroken)), writer.read_losses(str(broken))
  assert sorted(a) == sorted(b) == list(range(1, 11))
  for step in a:
    assert a[step]["loss"] == b[step]["loss"], (step, a[step], b[step])


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  args = ["train", "--config=configs/toy/teacher.py:runlocal", "--config.train.num_steps=100000",
          "--config.train.ckpt_every=100000", "--config.train.progress=False"]
  p = _cli(*args, workdir=str(tmp_path))
  deadline = time.time() + 300
  while time.time() < deadline and max(writer.read_losses(str(tmp_path)), default=0) < 3:
    time.sleep(0.05)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=120)
  assert p.returncode == 0, out
  mngr = checkpoint.manager(str(tmp_path / "ckpt"), keep=2, save_every=1)
  assert mngr.latest_step() >= 3   # the step it stopped at was saved although ckpt_every is huge


def test_quickstart_recipe_runlocal_end_to_end(tmp_path):
  # the whole chain (teacher -> TF -> TF-sCM -> SF-DMD -> report) for one block pattern; the slow test runs both
  arg = "--config=configs/toy/quickstart.py:runlocal,patterns=c1-1"
  p = _cli("recipe", arg, workdir=str(tmp_path))
  out, _ = p.communicate(timeout=900)
  assert p.returncode == 0, out
  metrics = json.loads((tmp_path / "eval_teacher" / "metrics.json").read_text())
  assert set(metrics["calibration"]) >= {"ceiling", "floor"}
  assert len(metrics["rows"]) == 2 and set(metrics["samples_per_s"]) == set(metrics["rows"])
  assert (tmp_path / "eval_teacher" / "metrics_vs_steps.png").exists()
  assert (tmp_path / "eval_sf_c11" / "samples" / "eval_2step.gif").exists()
  assert any((tmp_path / "teacher" / "tb").iterdir())
  table = (tmp_path / "report" / "table.md").read_text()
  for row in ("teacher 2-step", "TF-sCM c1-1 1-step", "SF-DMD c1-1 2-step", "floor (untrained)", "ceiling"):
    assert row in table, table
  assert "| NFE | samples/s |" in table and "1+1 per chunk" in table   # the rollout's cache pass is counted
  assert "report" in out and "SF-DMD c1-1 1-step" in out
  # a second run skips the finished stages and changes nothing (the report is rebuilt)
  stamp = (tmp_path / "eval_sf_c11" / "metrics.json").stat().st_mtime
  p = _cli("recipe", arg, workdir=str(tmp_path))
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out
  assert (tmp_path / "eval_sf_c11" / "metrics.json").stat().st_mtime == stamp


@pytest.mark.slow
def test_quickstart_recipe_runlocal_both_patterns(tmp_path):
  p = _cli("recipe", "--config=configs/toy/quickstart.py:runlocal", workdir=str(tmp_path))
  out, _ = p.communicate(timeout=1800)
  assert p.returncode == 0, out
  table = (tmp_path / "report" / "table.md").read_text()
  assert "SF-DMD c1-1 2-step" in table and "SF-DMD c2-3 2-step" in table


def test_camera_pan_world_model_recipe_runlocal(tmp_path):
  # the action-conditioned world: actions per frame and the first frame (y) condition the teacher
  p = _cli("recipe", "--config=configs/toy/quickstart.py:world=camera_pan,runlocal,teacher_only",
           workdir=str(tmp_path))
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out
  metrics = json.loads((tmp_path / "eval_teacher" / "metrics.json").read_text())
  assert set(metrics["calibration"]["ceiling"]) == {"camera/psnr", "camera/ssim", "camera/action_accuracy"}
  cfg = json.loads((tmp_path / "teacher" / "config.json").read_text())
  assert cfg["world"] == "camera_pan"


def test_divergence_stops_with_a_clear_message_and_finite_checkpoints(tmp_path):
  from rcm_jax import recipes

  name = "always_nan_for_test"
  if name not in recipes.RECIPES:
    @recipes.register(name)
    class AlwaysNaN(recipes.get_recipe("rf")):
      def loss(self, params, frozen, batch, rng, step):
        loss, metrics = super().loss(params, frozen, batch, rng, step)
        return loss * jnp.nan, dict(metrics, loss=loss * jnp.nan)

  cfg = _config()
  cfg.recipe = name
  cfg.train.nan_patience, cfg.train.num_steps, cfg.train.ckpt_every = 3, 10, 1
  cfg.train.progress = False
  with pytest.raises(trainer.TrainingDiverged, match="train.nan_patience"):
    trainer.train(cfg, str(tmp_path))
  params, step = checkpoint.load_params(str(tmp_path), use_ema=False)
  assert step <= 3
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_quickstart_config_wires_the_chosen_tf_cm_stage_into_sf_dmd():
  import importlib.util
  spec = importlib.util.spec_from_file_location("_qs", os.path.join(os.path.dirname(__file__), "..", "configs",
                                                                    "toy", "quickstart.py"))
  qs = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(qs)
  c = qs.get_config("objective=dcm,patterns=c2-3")
  assert c.stages.tf_dcm_c23.recipe == "tf_dcm" and c.stages.tf_dcm_c23.init_from == "tf_c23"
  assert c.stages.sf_dmd_c23.init_from == "tf_dcm_c23" and c.stages.sf_dmd_c23.teacher_from == "teacher"
  assert c.stages.sf_dmd_c23.causal.first_chunk_frames == 2 and c.stages.sf_dmd_c23.causal.chunk_frames == 3
  assert tuple(c.stages.report.sources) == ("eval_teacher", "eval_dcm_c23", "eval_sf_c23")
  assert c.stage_order[-1] == "report"
  with pytest.raises(ValueError, match="objective='kd'"):
    qs.get_config("objective=kd")


def test_recipe_with_a_report_before_its_sources_stops_with_one_message(tmp_path):
  p = _cli("recipe", "--config=configs/toy/quickstart.py:runlocal,patterns=c1-1",
           "--config.stage_order=('teacher','report','eval_teacher')", workdir=str(tmp_path))
  out, _ = p.communicate(timeout=120)
  assert p.returncode != 0
  assert "stages.report.sources" in out and "Traceback" not in out
  assert not (tmp_path / "teacher").exists()   # refused before any stage ran


def test_benchmark_compile_only_matches_the_allocated_compile():
  """benchmarks/train_step.py --compile_only builds the state from shapes alone; XLA's memory analysis must be
  the one of the real (allocated) update (SF-DMD: its own update, critic state built from the teacher)."""
  import argparse
  import importlib.util
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("train_step_bench", os.path.join(root, "benchmarks", "train_step.py"))
  ts = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ts)
  args = argparse.Namespace(tiny=True, layers=None, latent_hw=None, mesh=ts.parse_mesh([]), remat="none",
                            chunk=(2, 2), batch=1, critic_steps=1, no_replay=False, iters=1, peak_tflops=1.0,
                            profile=False, mu_dtype="bfloat16")   # bf16 first moments: shapes and dtypes
  geo = ts.shapes(args)
  rows = {}
  for compile_only in (True, False):
    args.compile_only = compile_only
    rows[compile_only] = ts.run_recipe(args, geo, "sf_dmd", 4)
  assert rows[True]["compile_only"] and rows[True]["compiled_memory_bytes"]["temp_size_in_bytes"] > 0
  assert rows[True]["compiled_memory_bytes"] == rows[False]["compiled_memory_bytes"]
  assert rows[True]["params_bytes"] == 4 * rows[False]["params"]     # fp32 master weights


def test_hlo_fusions_names_a_profiles_kernels():
  """benchmarks/hlo_fusions.py: a profile's kernel (fusion_383 for the HLO's %fusion.383) -> its fused
  computation and the JAX source lines of its ops, from the module's stack-frame tables; a header whose
  parameter list carries '/*index=5*/' comments still opens a computation."""
  import importlib.util
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("hlo_fusions", os.path.join(root, "benchmarks", "hlo_fusions.py"))
  hf = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(hf)
  n = int(np.random.default_rng().integers(2, 999))
  text = "\n".join([
      "HloModule jit_fn", "", "FileNames", '1 "/x/rcm_jax/models/layers.py"', '2 "/y/flax/linen/linear.py"', "",
      "FunctionNames", '1 "f"', "", "FileLocations",
      "1 {file_name_id=1 function_name_id=1 line=214 end_line=214 column=0 end_column=1}",
      "2 {file_name_id=2 function_name_id=1 line=287 end_line=287 column=0 end_column=1}", "",
      "StackFrames", "1 {file_location_id=1 parent_frame_id=1}", "2 {file_location_id=2 parent_frame_id=1}", "",
      f"%fused_gelu (p0: f32[4], p1: f32[4], p2: f32[4], p3: f32[4], p4: f32[4], /*index=5*/p5: f32[4]) -> f32[4] {{",
      '  %p0 = f32[4]{0} parameter(0), metadata={op_name="jit(fn)/ffn/tanh" stack_frame_id=2}',
      '  ROOT %t = f32[4]{0} tanh(%p0), metadata={op_name="jit(fn)/ffn/tanh" stack_frame_id=2}', "}", "",
      "ENTRY %main (a: f32[4]) -> f32[4] {",
      "  %a = f32[4]{0} parameter(0)",
      f'  ROOT %fusion.{n} = f32[4]{{0}} fusion(%a), kind=kLoop, calls=%fused_gelu, '
      'metadata={op_name="jit(fn)/ffn/mul" stack_frame_id=2}', "}"])
  instrs, comps = hf.parse_module(text)
  assert set(comps) == {"fused_gelu", "main"} and f"fusion.{n}" in instrs
  out = hf.describe(f"fusion_{n}", instrs, comps, 10, hf.parse_frames(text, "rcm_jax"))
  assert "shape: f32[4]{0}" in out and "tanh(%p0)" in out
  assert "jit(fn)/ffn/mul  (/x/rcm_jax/models/layers.py:214)" in out   # our frame, not flax's inner one
  assert "not in this module" in hf.describe("fusion_0", instrs, comps, 10)


def test_profile_summary_busy_time_and_classes():
  """benchmarks/profile_summary.py: device events only, overlapping kernels counted once in the busy time."""
  import importlib.util
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("profile_summary", os.path.join(root, "benchmarks",
                                                                                "profile_summary.py"))
  ps = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ps)
  rng = np.random.default_rng()
  t0 = float(rng.integers(0, 10**6))
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}]
  ev = lambda name, ts, dur, pid=1: {"ph": "X", "pid": pid, "tid": 0, "name": name, "ts": t0 + ts, "dur": dur}
  events = meta + [ev("flash_fwd", 0, 400), ev("nvjet_hsh_gemm", 300, 200),     # overlap 300..400
                   ev("loop_add_fusion", 1000, 100), ev("flash_fwd", 1500, 400),
                   ev("PjitFunction(step)", 0, 5000, pid=2)]                      # host: left out
  s = ps.summarize(events)
  assert s["span_ms"] == pytest.approx(1.9) and s["busy_ms"] == pytest.approx(1.0)
  assert s["idle_ms"] == pytest.approx(0.9)
  assert s["classes"] == pytest.approx({"attention": 0.8, "matmul": 0.2, "other": 0.1})
  assert s["kernels"][0][:3] == ("flash_fwd", "attention", 2)
  assert "| attention | 0.80 |" in ps.to_markdown(s)
  seq = ps.calls(events, "flash", first=5).splitlines()[2:]   # each call in start order, host events left out
  assert len(seq) == 2 and "| 0 | 0.000 | 400.0 |" in seq[0] and "| 1 | 1.500 | 400.0 |" in seq[1]
  assert "no device call" in ps.calls(events, "PjitFunction")
