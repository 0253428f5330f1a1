"""Numerical agreement across GPU counts (issue 9, item 3): the same losses on 1 and N GPUs for a fixed seed and
batch, and a checkpoint saved on N GPUs restored on 1.

Toy stages through the CLI (the code users run): an rf teacher and a TF stage on one GPU, then TF-sCM (JVP through
the model) trained for `--steps` + `--more` steps on 1 GPU and, from the same init, for `--steps` on N GPUs under
each mesh in `--meshes`; per-step losses are compared. Then each N-GPU checkpoint is resumed on 1 GPU for `--more`
steps and compared with the 1-GPU run's last steps (the checkpoint restores across meshes; a resumed run
reproduces an unbroken one). The runs of one phase share the cards at the same time (toy sizes, memory not
preallocated); they are checks, not timings.

  python benchmarks/multi_gpu_check.py --out $OUT --meshes fsdp=2 data=2 context=2
Writes <out>/multi_gpu_check.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(args, workdir, gpus: int):
  env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(gpus)), PYTHONUNBUFFERED="1",
             XLA_PYTHON_CLIENT_PREALLOCATE="false")   # runs of toy size share the cards
  if os.environ.get("JAX_PLATFORMS") == "cpu":   # a dry run of this script on fake CPU devices
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={gpus}"
  cmd = [sys.executable, "-m", "rcm_jax.main", *args, f"--workdir={workdir}", "--config.train.progress=False"]
  return cmd, gpus, time.time(), subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                                  stderr=subprocess.PIPE, text=True)


def cli(runs, log):
  """Run [(args, workdir, gpus), ...] at the same time (toy runs: memory is not preallocated); all must pass."""
  procs = [_launch(*r) for r in runs]
  failed = []
  for cmd, gpus, t0, p in procs:
    out, err = p.communicate()
    log.write(f"$ {' '.join(cmd)}  [{gpus} GPU, {time.time() - t0:.0f} s, rc {p.returncode}]\n{out[-3000:]}\n"
              f"{err[-3000:]}\n")
    log.flush()
    if p.returncode:
      failed.append(f"{' '.join(cmd)}\n{err[-2000:]}")
  if failed:
    raise SystemExit("failed:\n" + "\n".join(failed))


def losses(workdir):
  out = {}
  with open(os.path.join(workdir, "losses.jsonl")) as f:
    for line in f:
      if line.strip():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", required=True)
  ap.add_argument("--root", default="/tmp/multi_gpu_check")
  ap.add_argument("--gpus", type=int, default=2)
  ap.add_argument("--meshes", nargs="+", default=["fsdp=2", "data=2", "context=2"])
  ap.add_argument("--steps", type=int, default=12)
  ap.add_argument("--more", type=int, default=6)
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  log = open(os.path.join(args.out, "multi_gpu_check.log"), "w")
  cfg = "--config=configs/toy/causal.py:objective=scm"
  common = [cfg, "--config.train.log_every=1", "--config.train.sample_at_end=False", "--config.train.ckpt_every=1000"]
  teacher, tf = os.path.join(args.root, "teacher"), os.path.join(args.root, "tf")
  data = ["--config.data.num_train_videos=256"]
  stage = [*common, *data, "--config.train.num_steps=40", "--config.mesh.data=1"]
  cli([(["train", *stage], teacher, 1)], log)
  cli([(["train", *stage, "--config.recipe=tf", f"--config.init_from={teacher}"], tf, 1)], log)
  scm = [*common, *data, "--config.recipe=tf_scm", f"--config.init_from={tf}", f"--config.teacher_from={tf}",
         "--config.optim.b1=0.0", "--config.optim.lr=2e-4", "--config.diffusion.p_uncond=0.0"]
  one_gpu = ["--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.context=1", "--config.mesh.tensor=1"]
  meshes = {}
  for mesh in args.meshes:
    axis, n = mesh.split("=")
    meshes[mesh] = ([f"--config.mesh.{a}={int(n) if a == axis else 1}" for a in ("data", "fsdp", "context", "tensor")],
                    os.path.join(args.root, f"scm_{axis}{n}"))
  # the reference runs all steps on one GPU (a resumed run reproduces an unbroken one: the trainer's contract);
  # each mesh runs the first `steps` on N GPUs, then its checkpoint is resumed on one GPU for `more` steps
  one = os.path.join(args.root, "scm_1gpu")
  cli([(["train", *scm, f"--config.train.num_steps={args.steps + args.more}", *one_gpu], one, 1)] +
      [(["train", *scm, f"--config.train.num_steps={args.steps}", *flags], wd, args.gpus)
       for flags, wd in meshes.values()], log)
  multi = {m: losses(wd) for m, (_, wd) in meshes.items()}
  cli([(["train", *scm, f"--config.train.num_steps={args.steps + args.more}", *one_gpu], wd, 1)
       for _, wd in meshes.values()], log)
  ref = losses(one)
  results = {"gpus": args.gpus, "steps": args.steps, "more": args.more, "runs": {}}
  for mesh, (_, wd) in meshes.items():
    resumed = losses(wd)
    rel = max(abs(multi[mesh][s] - ref[s]) / max(abs(ref[s]), 1e-12) for s in range(1, args.steps + 1))
    rel_resumed = max(abs(resumed[s] - ref[s]) / max(abs(ref[s]), 1e-12)
                      for s in range(args.steps + 1, args.steps + args.more + 1))
    results["runs"][mesh] = {"max_rel_loss_diff_vs_1gpu": rel, "max_rel_loss_diff_after_restore_on_1gpu": rel_resumed,
                             "losses_1gpu": [ref[s] for s in sorted(ref)],
                             "losses_multi": [multi[mesh][s] for s in sorted(multi[mesh])],
                             "losses_resumed_on_1gpu": [resumed[s] for s in sorted(resumed) if s > args.steps]}
    print(f"{mesh}: max rel loss diff vs 1 GPU {rel:.2e}; after restoring on 1 GPU {rel_resumed:.2e}", flush=True)
  with open(os.path.join(args.out, "multi_gpu_check.json"), "w") as f:
    json.dump(results, f, indent=1)
  lines = ["| mesh | max rel. loss diff vs 1 GPU (steps 1-%d) | after restore on 1 GPU (steps %d-%d) |"
           % (args.steps, args.steps + 1, args.steps + args.more), "|---|---|---|"]
  lines += [f"| {m} | {r['max_rel_loss_diff_vs_1gpu']:.2e} | {r['max_rel_loss_diff_after_restore_on_1gpu']:.2e} |"
            for m, r in results["runs"].items()]
  with open(os.path.join(args.out, "multi_gpu_check.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
