"""Sweep config keys: run one CLI job per point of a grid, each in its own workdir, then tabulate.

  .venv/bin/python scripts/sweep.py train --config=configs/toy/teacher.py --workdir=runs/lr_sweep \
      --sweep optim.lr=1e-3,3e-4 --sweep train.batch_size=16,32 [--config.train.num_steps=500 ...]

Points run one after another (each resumes if interrupted); the summary table of every point's
metrics.json goes to <workdir>/sweep.md. On a cluster, launch the printed commands as separate jobs.
"""
import argparse
import itertools
import json
import os
import subprocess
import sys


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("command", choices=("train", "sample", "eval", "recipe"))
  ap.add_argument("--config", required=True)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                  help="a config key and its values; repeat for a grid")
  ap.add_argument("--dry_run", action="store_true", help="print the commands only")
  args, passthrough = ap.parse_known_args()
  if not args.sweep:
    ap.error("give at least one --sweep KEY=V1,V2")
  axes = []
  for item in args.sweep:
    key, sep, values = item.partition("=")
    if not sep or not values:
      ap.error(f"--sweep {item!r}: write KEY=V1,V2")
    axes.append([(key, v) for v in values.split(",")])
  rows = []
  for point in itertools.product(*axes):
    name = ",".join(f"{k}={v}" for k, v in point)
    workdir = os.path.join(args.workdir, name.replace("/", "_"))
    cmd = [sys.executable, "-m", "rcm_jax.main", args.command, f"--config={args.config}",
           f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in point], *passthrough]
    print(" ".join(cmd), flush=True)
    if args.dry_run:
      continue
    rc = subprocess.call(cmd)
    metrics_path = os.path.join(workdir, "metrics.json")
    metrics = json.load(open(metrics_path)) if os.path.exists(metrics_path) else {}
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    rows.append((name, rc, flat))
  if rows:
    keys = sorted({k for _, _, m in rows for k in m})
    lines = ["| point | exit | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for name, rc, m in rows:
      lines.append(f"| {name} | {rc} | " + " | ".join(f"{m[k]:.4g}" if k in m else "" for k in keys) + " |")
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "sweep.md"), "w") as f:
      f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
  main()
