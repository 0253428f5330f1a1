"""Wall-clock seconds per training iteration of every toy stage of the recipe, on whatever device runs it.

Each stage trains `--steps` iterations from its real predecessor (teacher -> TF / DF -> TF-KD / TF-dCM /
TF-sCM / TF-MeanFlow -> SF-DMD), logging every step; the time per iteration is the median gap between
consecutive steps after the first `--skip` (compilation). Toy model and batch of configs/toy (dim 128, 4
layers, batch 16, 8 frames of 32 px).

  python experiments/step_time.py --root runs/step_time --steps 40
Writes experiments/results/step_time_<platform>.{md,json}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import common  # noqa: E402

# (run name, config file, config argument, stage in that config, init run, teacher run)
CHAIN = (
    ("teacher (rf)", "causal", "objective=scm", "teacher", None, None),
    ("TF", "causal", "objective=scm", "tf", "teacher (rf)", None),
    ("DF", "causal", "objective=scm", "tf", "teacher (rf)", None),
    ("TF-KD", "causal", "objective=kd", "tf_kd", "TF", "teacher (rf)"),
    ("TF-dCM", "causal", "objective=dcm", "tf_dcm", "TF", "TF"),
    ("TF-sCM", "causal", "objective=scm", "tf_scm", "TF", "TF"),
    ("TF-MeanFlow", "causal", "objective=meanflow", "tf_meanflow", "TF", "TF"),
    ("SF-DMD (5 critic steps)", "sf_dmd", "", "sf_dmd", "TF-sCM", "teacher (rf)"),
)


def _dir(root: str, name: str) -> str:
  return os.path.join(root, name.split(" ")[0].lower())


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--root", required=True)
  ap.add_argument("--steps", type=int, default=40)
  ap.add_argument("--skip", type=int, default=3, help="first steps left out (compilation)")
  ap.add_argument("--pattern", default="c1-1")
  ap.add_argument("--results", default=os.path.join(common.ROOT, "experiments", "results"))
  args = ap.parse_args()
  root, data_root = os.path.abspath(args.root), os.path.join(os.path.abspath(args.root), "data")
  from rcm_jax.training import writer
  rows = {}
  for name, cfg_name, arg, stage_name, init, teacher in CHAIN:
    config = common.load_config(cfg_name, ",".join(a for a in (arg, f"pattern={args.pattern}") if a))
    over = {"train.num_steps": args.steps, "train.log_every": 1, "train.ckpt_every": 10 ** 6,
            "train.sample_at_end": False}
    if init:
      over["init_from"] = _dir(root, init)
    if teacher:
      over["teacher_from"] = _dir(root, teacher)
    if name == "DF":
      over["recipe"] = "df"
    cfg = common.stage(config, stage_name, root, **over)
    workdir = _dir(root, name)
    common.train(cfg, workdir, data_root)
    walls = [rec["wall"] for _, rec in sorted(writer.read_losses(workdir).items())]
    gaps = [b - a for a, b in zip(walls[args.skip:], walls[args.skip + 1:])]
    rows[name] = {"seconds_per_iter": statistics.median(gaps), "iters_timed": len(gaps)}
    print(f"{name:28s} {rows[name]['seconds_per_iter'] * 1e3:9.1f} ms/iter", flush=True)
  env = common.environment()
  base = rows["TF-dCM"]["seconds_per_iter"]
  lines = [f"# Seconds per training iteration, toy stages ({env}, pattern {args.pattern})", "",
           f"Command: `python experiments/step_time.py --root {args.root} --steps {args.steps} --pattern "
           f"{args.pattern}` (median step gap after {args.skip} warm-up steps; batch 16, toy model of configs/toy)",
           "", "| stage | ms / iteration | vs TF-dCM |", "|---|---|---|"]
  lines += [f"| {n} | {r['seconds_per_iter'] * 1e3:.1f} | {r['seconds_per_iter'] / base:.2f}x |" for n, r in rows.items()]
  platform = env.split(":")[0]
  os.makedirs(args.results, exist_ok=True)
  with open(os.path.join(args.results, f"step_time_{platform}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  common.write_json(os.path.join(args.results, f"step_time_{platform}.json"), {"environment": env, "rows": rows})
  print("\n".join(lines))


if __name__ == "__main__":
  main()
