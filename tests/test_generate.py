"""The generate job (teacher samples as a dataset) and training on it, on the runlocal toy configs.

A teacher here is an untrained runlocal model saved as a checkpoint: what is tested is where its samples
go and with which conditions, not their quality.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from rcm_jax.data import pipeline as pipeline_lib
from rcm_jax.data import records
from rcm_jax.errors import UserError
from rcm_jax.training import checkpoint, generate, optim, setup
from rcm_jax.training.state import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_VIDEOS, SHARD_SIZE = 10, 4   # 3 shards: 4 + 4 + 2
TEACHER_STEP = 7


def _config(path="configs/toy/teacher.py", arg="runlocal"):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("generate")


@pytest.fixture(scope="module")
def teacher(root):
  """An untrained runlocal teacher saved at step TEACHER_STEP, as the trainer saves it."""
  cfg = _config()
  world = setup.make_world(cfg)
  probe = setup.prepare(world, world.generate(1, 0, "train"))
  model = setup.make_model(cfg, world)
  params = model.init(jax.random.key(0), probe["video"], np.zeros(probe["video"].shape[:2], np.float32),
                      **probe["cond"])
  state = TrainState.create(params, optim.make_optimizer(cfg.optim), use_ema=True)
  mngr = checkpoint.manager(str(root / "teacher" / "ckpt"), keep=1, save_every=1)
  checkpoint.save(mngr, TEACHER_STEP, state, force=True)
  mngr.wait_until_finished()
  mngr.close()
  return str(root / "teacher")


def _gen_config(teacher, **generate_keys):
  cfg = _config()
  cfg.data.num_train_videos = NUM_VIDEOS
  cfg.generate.update(dict(dict(checkpoint=teacher, shard_size=SHARD_SIZE, batch_size=SHARD_SIZE, steps=2,
                                cfg_scale=2.0), **generate_keys))
  return cfg


def _run(cfg, root, name, **kw):
  return generate.generate(cfg, str(root / name), data_root=str(root / "data"), **kw)


def _shards(path):
  return sorted(f for f in os.listdir(path) if f.startswith("shard-"))


def _mtimes(path):
  return {f: os.stat(os.path.join(path, f)).st_mtime_ns for f in _shards(path)}


@pytest.fixture(scope="module")
def single(teacher, root):
  """One complete single-process run: the reference for the other tests."""
  result = _run(_gen_config(teacher), root, "single")
  return result, pipeline_lib.load_all(result["dataset"], progress=False)


def _assert_same_dataset(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_writes_teacher_samples_with_the_conditions_that_produced_them(teacher, root, single):
  result, got = single
  assert result["complete"] and result["num_videos"] == NUM_VIDEOS and result["num_shards"] == 3
  assert result["dataset"] == str(root / "data" / "moving_digits_teacher_single")
  real = pipeline_lib.load_all(records.dataset_dir(root / "data", "moving_digits", "train"), progress=False)
  assert set(got) == set(real) | {"teacher_step"}
  for k in real:
    if k != "video":
      np.testing.assert_array_equal(got[k], real[k][:NUM_VIDEOS], err_msg=k)
  np.testing.assert_array_equal(got["teacher_step"], np.full(NUM_VIDEOS, TEACHER_STEP))
  assert got["video"].dtype == np.float32 and got["video"].shape == real["video"][:NUM_VIDEOS].shape
  assert not np.allclose(got["video"], real["video"][:NUM_VIDEOS])

  manifest = records.read_manifest(result["dataset"])
  assert manifest["generate"]["checkpoint"] == teacher and manifest["teacher_step"] == TEACHER_STEP
  assert (manifest["generate"]["steps"], manifest["generate"]["cfg_scale"]) == (2, 2.0)
  assert [s["num_records"] for s in manifest["shards"]] == [4, 4, 2]
  assert json.loads((root / "single" / "metrics.json").read_text())["dataset"] == result["dataset"]

  # shard 1 is the teacher's CFG sample of its conditions with the noise fold_in(key(seed), 1)
  cfg = _gen_config(teacher)
  world = setup.make_world(cfg)
  params, _ = checkpoint.load_params(teacher, use_ema=True)
  batch = setup.prepare(world, {k: v[4:8] for k, v in real.items()})
  want = setup.sample_videos(cfg, setup.make_model(cfg, world), params, batch,
                             jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 1), 0), num=4,
                             num_steps=2, cfg_scale=2.0)
  np.testing.assert_allclose(got["video"][4:8], want, atol=2e-3)   # float16 storage


def test_an_interrupted_run_resumes_without_rewriting_finished_shards(teacher, root, single):
  cfg = _gen_config(teacher)
  first = _run(cfg, root, "resume", max_shards=2)   # killed after two shards
  path = first["dataset"]
  assert not first["complete"] and first["missing_shards"] == [2]
  assert not os.path.exists(os.path.join(path, records.MANIFEST))
  assert not (root / "resume" / "metrics.json").exists()
  before = _mtimes(path)
  assert len(before) == 2
  second = _run(cfg, root, "resume")
  assert second["complete"] and second["shards_written_this_run"] == [2]
  assert {f: t for f, t in _mtimes(path).items() if f in before} == before
  _assert_same_dataset(pipeline_lib.load_all(path, progress=False), single[1])

  # killed before the manifest, while writing the last shard: only that shard is written again
  os.remove(os.path.join(path, records.MANIFEST))
  last = _shards(path)[-1]
  os.remove(os.path.join(path, last))
  before = _mtimes(path)
  third = _run(cfg, root, "resume")
  assert third["shards_written_this_run"] == [2] and _shards(path)[-1] == last
  assert {f: t for f, t in _mtimes(path).items() if f in before} == before
  _assert_same_dataset(pipeline_lib.load_all(path, progress=False), single[1])
  assert _run(cfg, root, "resume")["shards_written_this_run"] == []   # finished: nothing to do


def test_a_mismatched_request_names_the_key(teacher, root, single):
  with pytest.raises(records.DatasetMismatchError, match="generate.cfg_scale"):
    _run(_gen_config(teacher, cfg_scale=3.0), root, "single")
  _run(_gen_config(teacher), root, "partial", max_shards=1)   # unfinished: request.json is checked
  with pytest.raises(records.DatasetMismatchError, match="generate.steps"):
    _run(_gen_config(teacher, steps=3), root, "partial")
  other = os.path.join(str(root), "teacher_copy")
  shutil.copytree(teacher, other)
  with pytest.raises(records.DatasetMismatchError, match="generate.checkpoint"):
    _run(_gen_config(other), root, "partial")


@pytest.mark.parametrize("key,value,match", [
    ("generate.cfg_scale", 0.5, "generate.cfg_scale"),
    ("generate.video_dtype", "uint8", "generate.video_dtype"),
    ("generate.num_videos", NUM_VIDEOS + 1, "generate.num_videos"),
    ("generate.shard_size", 0, "generate.shard_size"),
    ("data.source", "web", "data.source"),
])
def test_bad_generate_configs_name_the_key(teacher, root, key, value, match):
  cfg = _gen_config(teacher)
  section, leaf = key.split(".")
  cfg[section][leaf] = value
  with pytest.raises(UserError, match=match):
    _run(cfg, root, "bad")


def test_two_processes_write_disjoint_shards_whose_union_is_the_single_run(teacher, root, single):
  cfg = _gen_config(teacher)
  path = str(root / "data" / "moving_digits_teacher_two")
  p0 = _run(cfg, root, "two", process_index=0, process_count=2)
  assert p0["shards_written_this_run"] == [0, 2] and not p0["complete"] and p0["missing_shards"] == [1]
  p1 = _run(cfg, root, "two", process_index=1, process_count=2)
  assert p1["shards_written_this_run"] == [1]
  assert not os.path.exists(os.path.join(path, records.MANIFEST))   # only process 0 writes it
  before = _mtimes(path)
  p0 = _run(cfg, root, "two", process_index=0, process_count=2)
  assert p0["complete"] and p0["shards_written_this_run"] == [] and _mtimes(path) == before
  _assert_same_dataset(pipeline_lib.load_all(path, progress=False), single[1])


def test_training_with_data_source_teacher_reads_the_teacher_samples(teacher, root, single):
  from rcm_jax.training import trainer
  cfg = _config()
  cfg.data.num_train_videos = NUM_VIDEOS
  cfg.data.source = "teacher"
  with pytest.raises(UserError, match="data.teacher_from"):
    setup.validate(cfg)
  cfg.data.teacher_from = str(root / "nowhere")
  with pytest.raises(UserError, match="data.teacher_from"):
    setup.ensure_data(cfg, setup.make_world(cfg), str(root / "data"), split="train")
  cfg.data.teacher_from = str(root / "single")   # the generate job's workdir
  world = setup.make_world(cfg)
  assert setup.ensure_data(cfg, world, str(root / "data"), split="train") == single[0]["dataset"]
  assert setup.ensure_data(cfg, world, str(root / "data"), split="test").endswith("moving_digits_test")
  batch = setup.first_batch(cfg, world, single[0]["dataset"])
  videos = single[1]["video"].reshape(NUM_VIDEOS, -1)
  for v in batch["video"].reshape(len(batch["video"]), -1):   # every training video is a teacher sample
    assert np.any(np.all(videos == v, axis=1))

  cfg.init_from = teacher
  cfg.train.num_steps, cfg.train.sample_at_end, cfg.train.progress = 1, False, False
  result = trainer.train(cfg, str(root / "student"), data_root=str(root / "data"))
  assert result["step"] == 1 and np.isfinite(result["final_loss"])


def test_cli_generate_writes_the_dataset_and_reports_bad_input_without_traceback(teacher, root):
  def cli(*flags):
    args = [sys.executable, "-m", "rcm_jax.main", "generate", "--config=configs/toy/teacher.py:runlocal",
            f"--workdir={root / 'cli'}", f"--config.generate.checkpoint={teacher}",
            f"--config.data.num_train_videos={NUM_VIDEOS}", f"--config.generate.shard_size={SHARD_SIZE}", *flags]
    return subprocess.run(args, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=300)
  bad = cli(f"--config.generate.checkpoint={root / 'nowhere'}")
  assert bad.returncode != 0 and "generate.checkpoint" in bad.stderr and "Traceback" not in bad.stderr
  ok = cli()
  assert ok.returncode == 0, ok.stderr
  metrics = json.loads((root / "cli" / "metrics.json").read_text())
  assert metrics["complete"] and metrics["num_videos"] == NUM_VIDEOS
  assert metrics["dataset"] == str(root / "cli" / "data" / "moving_digits_teacher_cli")


def test_causal_recipe_data_teacher_inserts_a_generate_stage():
  from rcm_jax.training import pipeline
  cfg = _config("configs/toy/causal.py", "runlocal,data=teacher")
  assert cfg.stage_order[:3] == ("teacher", "generate", "tf")
  gen = pipeline.stage_config(cfg, "generate", "/w")
  assert gen.generate.checkpoint == "/w/teacher" and gen.data.source == "real"
  for name in ("tf", "tf_scm"):
    s = pipeline.stage_config(cfg, name, "/w")
    assert (s.data.source, s.data.teacher_from) == ("teacher", "/w/generate")
  assert pipeline.stage_config(cfg, "eval_tf", "/w").data.source == "real"
  assert "generate" not in _config("configs/toy/causal.py", "runlocal").stage_order
