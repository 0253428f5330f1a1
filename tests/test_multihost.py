"""Multi-host training: two CPU processes on localhost, joined by `jax.distributed` (gloo collectives), train a
few steps together and log the losses of one process training the same global batches alone.

Each process is this file run as a script: it reads COORDINATOR_ADDRESS / NUM_PROCESSES / PROCESS_ID (the
variables `rcm_jax.parallel.distributed` reads; a free localhost port), initializes, and runs the trainer on a
`data=2` mesh of the two processes' one CPU device each. The grain pipeline gives each process its half of
every global batch and only process 0 writes losses.jsonl, metrics.json and the checkpoints' metadata.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def _config(steps=STEPS):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs/toy/teacher.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("runlocal")
  c.train.batch_size, c.train.num_steps, c.train.log_every = 4, steps, 1
  c.train.sample_at_end, c.train.progress, c.train.ckpt_every = False, False, 2
  c.optim.warmup_steps = 0
  return c


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _worker(workdir: str, data_root: str) -> None:
  import jax
  from rcm_jax.parallel import distributed
  assert distributed.maybe_initialize(), "the test sets COORDINATOR_ADDRESS"
  assert jax.process_count() == 2 and jax.device_count() == 2 and jax.local_device_count() == 1
  from rcm_jax.training import trainer
  cfg = _config()
  cfg.mesh.data = -1   # both processes' devices
  result = trainer.train(cfg, workdir, data_root=data_root)
  print("RESULTS " + json.dumps({"process": jax.process_index(), "step": result["step"],
                                 "final_loss": result["final_loss"]}), flush=True)
  jax.distributed.shutdown()


def test_two_processes_on_localhost_train_together_and_match_one_process(tmp_path):
  from rcm_jax.training import setup, trainer, writer
  data_root = str(tmp_path / "data")
  cfg = _config()
  world = setup.make_world(cfg)
  setup.ensure_data(cfg, world, data_root, split="train")   # written once, before the processes start
  one = trainer.train(_config(), str(tmp_path / "one"), data_root=data_root)

  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               NUM_PROCESSES="2", PROCESS_ID=str(pid), XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), str(tmp_path / "two"), data_root],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=600)
      assert p.returncode == 0, out[-2000:] + err[-6000:]
      outs.append(json.loads([l for l in out.splitlines() if l.startswith("RESULTS ")][-1][len("RESULTS "):]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert sorted(o["process"] for o in outs) == [0, 1] and all(o["step"] == STEPS for o in outs)
  # Both processes hold the same (replicated) loss, equal to the single process's on the same global batches.
  for o in outs:
    np.testing.assert_allclose(o["final_loss"], one["final_loss"], rtol=1e-4)
  two_log, one_log = writer.read_losses(str(tmp_path / "two")), writer.read_losses(str(tmp_path / "one"))
  assert sorted(two_log) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([two_log[s]["loss"] for s in sorted(two_log)],
                             [one_log[s]["loss"] for s in sorted(one_log)], rtol=1e-4)
  with open(tmp_path / "two" / "losses.jsonl") as f:   # one writer: every step logged exactly once
    assert len([l for l in f if l.strip()]) == STEPS
  assert not os.path.exists(tmp_path / "two" / "samples")


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  _worker(sys.argv[1], sys.argv[2])
