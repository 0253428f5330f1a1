"""What the experiment scripts share: configs by stage, train-then-evaluate curves, parallel runs, tables, plots.

An experiment is a set of runs of the recipe's own stages (the same `trainer.train` and `jobs.evaluate` as the
CLI), laid out under one root: shared prefixes (the teacher, TF) run once; the runs that differ go to separate
sub-directories and can run as parallel processes (`run_parallel`: on a GPU several toy runs share the card).
Everything resumes: a finished stage or evaluation is skipped when the command is run again.
Presets scale a run by config alone: `smoke` (seconds, for the tests), `cpu` (the toy lengths of configs/toy),
`gpu` (longer training, more evaluation videos).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str = "") -> ml_collections.ConfigDict:
  """configs/toy/<name>.py's get_config(arg)."""
  path = os.path.join(ROOT, "configs", "toy", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"_exp_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def stage(config, name: str, root: str, **overrides) -> ml_collections.ConfigDict:
  """The resolved config of stage `name` (stage-name references resolved under `root`), then `overrides`
  given as dotted keys (`train.num_steps=...`, `init_from=/abs/dir`)."""
  from rcm_jax.training import pipeline
  cfg = pipeline.stage_config(config, name, root)
  with cfg.unlocked():
    for key, value in overrides.items():
      *path, leaf = key.split(".")
      node = cfg
      for p in path:
        node = node[p]
      node[leaf] = value
  return cfg


def _metrics(workdir: str) -> dict | None:
  path = os.path.join(workdir, "metrics.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def train(cfg, workdir: str, data_root: str) -> dict:
  """Train a stage to cfg.train.num_steps (resuming; skipped when already there)."""
  from rcm_jax.training import trainer
  done = _metrics(workdir)
  if done and done.get("step", -1) >= cfg.train.num_steps:
    return done
  return trainer.train(cfg, workdir, data_root=data_root)


def evaluate(cfg, workdir: str, data_root: str) -> dict:
  from rcm_jax.training import jobs
  return _metrics(workdir) or jobs.evaluate(cfg, workdir, data_root=data_root)


def curve(train_cfg, eval_cfg, workdir: str, data_root: str, *, iters: int, every: int) -> list[dict]:
  """Train in segments of `every` iterations up to `iters`; after each segment evaluate the checkpoint.

  Returns one record per evaluation: iteration, metrics per sampler setting, and the seconds per iteration of
  the segment (compilation excluded: the first segment's time, which includes it, is reported separately)."""
  records = []
  path = os.path.join(workdir, "curve.json")
  before = {r["iteration"]: r for r in read_json(path)} if os.path.exists(path) else {}
  for k, it in enumerate(range(every, iters + 1, every)):
    cfg = ml_collections.ConfigDict(train_cfg.to_dict())
    cfg.train.num_steps = it
    done = _metrics(os.path.join(workdir, "train"))
    t0 = time.perf_counter()
    res = train(cfg, os.path.join(workdir, "train"), data_root)
    seconds = time.perf_counter() - t0
    fresh = not (done and done.get("step", -1) >= it)
    ecfg = ml_collections.ConfigDict(eval_cfg.to_dict())
    ecfg.eval.checkpoint = os.path.join(workdir, "train")
    ev = evaluate(ecfg, os.path.join(workdir, f"eval_{it:06d}"), data_root)
    rec = {"iteration": it, "rows": ev["rows"], "loss": res.get("final_loss"),
           "seconds": round(seconds, 2) if fresh else None, "includes_compile": k == 0}
    if not fresh and it in before:   # a resumed study keeps the timing its first run measured
      rec["seconds"], rec["includes_compile"] = before[it].get("seconds"), before[it].get("includes_compile", k == 0)
    records.append(rec)
    with open(path, "w") as f:
      json.dump(records, f, indent=1)
  return records


def run_parallel(commands: list[list[str]], jobs: int, log_dir: str) -> None:
  """Run commands as subprocesses, at most `jobs` at once; each one's output goes to log_dir/<i>.log.
  Raises if any fails (naming its log)."""
  os.makedirs(log_dir, exist_ok=True)
  # Runs of the same shapes compile the same programs: a shared persistent compilation cache saves that time.
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                                      os.path.join(os.path.dirname(log_dir), ".jax_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
  pending, running, failed = list(enumerate(commands)), [], []
  while pending or running:
    while pending and len(running) < jobs:
      i, cmd = pending.pop(0)
      log = open(os.path.join(log_dir, f"{i:02d}.log"), "w")
      log.write(" ".join(cmd) + "\n")
      log.flush()
      running.append((i, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log))
    time.sleep(1.0)
    for item in list(running):
      i, proc, log = item
      if proc.poll() is not None:
        running.remove(item)
        log.close()
        status = "ok" if proc.returncode == 0 else f"FAILED rc={proc.returncode}"
        print(f"[{time.strftime('%H:%M:%S')}] task {i}: {status}: {' '.join(commands[i][2:])}", flush=True)
        if proc.returncode:
          failed.append(os.path.join(log_dir, f"{i:02d}.log"))
  if failed:
    raise SystemExit(f"{len(failed)} task(s) failed; see {failed}")


def self_command(script: str, *args: str) -> list[str]:
  return [sys.executable, script, *args]


def environment() -> str:
  import jax
  dev = jax.devices()[0]
  return f"{dev.platform}: {dev.device_kind} x{jax.device_count()}, jax {jax.__version__}"


def write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=1)


def read_json(path: str):
  with open(path) as f:
    return json.load(f)
