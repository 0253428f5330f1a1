"""TF-dCM vs TF-sCM (and TF-MeanFlow) convergence at toy scale (issue 4; Causal-rCM section 5's claim).

From one TF checkpoint per block pattern, each objective trains for the same number of iterations; every
`--every` iterations its few-step samples (1/2/4 steps, causal sampler, no CFG) are scored with the toy metrics
against the floor (untrained) and ceiling (held-out real). The paper reports that sCM reaches in 1-2k
iterations what dCM reaches after 10k.

  python experiments/dcm_vs_scm.py --root runs/exp_dcm_vs_scm --preset gpu --jobs 6
  python experiments/dcm_vs_scm.py --root /tmp/exp_smoke --preset smoke --jobs 1
Writes <root>/... (every stage, resumable) and experiments/results/dcm_vs_scm_<preset>.{md,json,png}
(`--results` to change).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import common  # noqa: E402

OBJECTIVES = {"scm": "tf_scm", "dcm": "tf_dcm", "meanflow": "tf_meanflow"}
PRESETS = {   # lengths by preset: teacher, TF, the study's iterations and evaluation cadence
    "smoke": dict(arg="runlocal", teacher=4, teacher_batch=4, tf=4, iters=4, every=2, eval_videos=8),
    "cpu": dict(arg="", teacher=1500, teacher_batch=16, tf=400, iters=400, every=100, eval_videos=64),
    "gpu": dict(arg="", teacher=10000, teacher_batch=64, tf=3000, iters=3000, every=500, eval_videos=128),
}
METRICS = ("digits/class_accuracy", "digits/frechet")


def _config(objective: str, pattern: str, preset: dict):
  arg = f"objective={objective},pattern={pattern}" + (f",{preset['arg']}" if preset["arg"] else "")
  return common.load_config("causal", arg)


def _prefix_cfg(name: str, pattern: str, args, preset: dict):
  config = _config("scm", pattern, preset)
  if name == "teacher":
    return common.stage(config, "teacher", args.root, **{"train.num_steps": preset["teacher"],
                                                          "train.batch_size": preset["teacher_batch"]})
  return common.stage(config, "tf", args.root, **{"train.num_steps": preset["tf"],
                                                  "init_from": os.path.join(args.root, "teacher")})


def run_task(task: str, args) -> None:
  preset = PRESETS[args.preset]
  data_root = os.path.join(args.root, "data")
  kind, *rest = task.split(":")
  if kind == "teacher":
    if args.teacher:   # an existing teacher stage (e.g. the quickstart's): linked, not retrained
      os.makedirs(args.root, exist_ok=True)
      if not os.path.exists(os.path.join(args.root, "teacher")):
        os.symlink(os.path.abspath(args.teacher), os.path.join(args.root, "teacher"))
      return
    common.train(_prefix_cfg("teacher", "c1-1", args, preset), os.path.join(args.root, "teacher"), data_root)
  elif kind == "tf":
    (pattern,) = rest
    common.train(_prefix_cfg("tf", pattern, args, preset), os.path.join(args.root, pattern, "tf"), data_root)
  elif kind == "curve":
    objective, pattern = rest
    config = _config(objective, pattern, preset)
    tf_dir = os.path.join(args.root, pattern, "tf")
    train_cfg = common.stage(config, OBJECTIVES[objective], args.root, init_from=tf_dir, teacher_from=tf_dir)
    eval_cfg = common.stage(config, "eval_cm", args.root, **{"eval.num_videos": preset["eval_videos"],
                                                             "eval.batch_size": preset["eval_videos"]})
    common.curve(train_cfg, eval_cfg, os.path.join(args.root, pattern, objective), data_root,
                 iters=preset["iters"], every=preset["every"])
  else:
    raise SystemExit(f"unknown task {task!r}")


def _by_steps(rec) -> dict:
  """A curve record's rows keyed by the sampler's step count (labels carry the stage name)."""
  return {int(re.search(r"(\d+)-step", label).group(1)): m for label, m in rec["rows"].items()}


def report(args) -> str:
  rows, curves = [], {}
  for pattern in args.patterns:
    for objective in args.objectives:
      path = os.path.join(args.root, pattern, objective, "curve.json")
      curves[(pattern, objective)] = recs = common.read_json(path)
      for rec in recs:
        rows.append((pattern, objective, rec))
  some = common.read_json(os.path.join(args.root, args.patterns[0], args.objectives[0],
                                       f"eval_{curves[(args.patterns[0], args.objectives[0])][0]['iteration']:06d}",
                                       "metrics.json"))
  cal = some["calibration"]
  labels = sorted(_by_steps(rows[0][2]))
  head = ["pattern", "objective", "iteration", "segment s/iter"] + [f"{m.split('/')[1]} {n}-step"
                                                             for m in METRICS for n in labels]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for pattern, objective, rec in rows:
    sec = "" if rec["seconds"] is None or rec["includes_compile"] else f"{rec['seconds'] / args.every_used:.3f}"
    cells = [pattern, objective, str(rec["iteration"]), sec]
    cells += [f"{_by_steps(rec)[n][m]:.3f}" for m in METRICS for n in labels]
    lines.append("| " + " | ".join(cells) + " |")
  cal_line = "Calibration (same conditions): " + "; ".join(
      f"{m}: floor {cal['floor'][m]:.3f}, ceiling {cal['ceiling'][m]:.3f}" for m in METRICS)
  table = "\n".join(lines) + "\n\n" + cal_line + "\n"
  plot = _plot(curves, labels, cal, args)
  os.makedirs(args.results, exist_ok=True)
  md = os.path.join(args.results, f"dcm_vs_scm_{args.preset}.md")
  with open(md, "w") as f:
    f.write(f"# TF-dCM vs TF-sCM vs TF-MeanFlow ({args.preset} preset; {common.environment()})\n\n"
            f"Command: `python experiments/dcm_vs_scm.py --root {os.path.relpath(args.root, common.ROOT)} "
            f"--preset {args.preset} "
            f"--jobs {args.jobs} --patterns {','.join(args.patterns)} --objectives {','.join(args.objectives)}"
            + (f" --teacher {args.teacher}" if args.teacher else "") + f"`\n\n{table}\n{_step_times(args)}\n"
            f"Plot: {os.path.basename(plot)}\n")
  common.write_json(os.path.join(args.results, f"dcm_vs_scm_{args.preset}.json"),
                    {f"{p}/{o}": c for (p, o), c in curves.items()} | {"calibration": cal})
  print(table)
  return md


def _step_times(args) -> str:
  """Median seconds per iteration from each run's per-step wall clock (losses.jsonl), leaving out the first
  logged interval of every segment (restore and compilation)."""
  from rcm_jax.training import writer
  lines = ["Seconds per iteration (median gap between logged steps, compilation left out):"]
  for pattern in args.patterns:
    for objective in args.objectives:
      recs = [r for _, r in sorted(writer.read_losses(os.path.join(args.root, pattern, objective, "train")).items())
              if "wall" in r]
      gaps = [(b["wall"] - a["wall"]) / (b["step"] - a["step"]) for a, b in zip(recs, recs[1:])
              if a["step"] % args.every_used]
      if gaps:
        lines.append(f"- {pattern} {objective}: {statistics.median(gaps):.3f} s ({len(gaps)} gaps)")
  return "\n".join(lines) + "\n"


def _plot(curves, labels, cal, args) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(len(METRICS), len(args.patterns), figsize=(5 * len(args.patterns), 3.4 * len(METRICS)),
                           squeeze=False)
  styles = {"scm": "-", "dcm": "--", "meanflow": ":"}
  for col, pattern in enumerate(args.patterns):
    for row, metric in enumerate(METRICS):
      ax = axes[row][col]
      for objective in args.objectives:
        recs = curves[(pattern, objective)]
        for j, n in enumerate(labels):
          ax.plot([r["iteration"] for r in recs], [_by_steps(r)[n][metric] for r in recs], styles[objective],
                  color=f"C{j}", marker="o", ms=3, label=f"{objective} {n}-step")
      ax.axhline(cal["ceiling"][metric], color="g", lw=0.8, label="ceiling")
      ax.axhline(cal["floor"][metric], color="r", lw=0.8, label="floor")
      if metric.endswith("frechet"):   # the floor sits an order of magnitude above the models
        ax.set_yscale("log")
      ax.set_title(f"{pattern}: {metric}", fontsize=9)
      ax.set_xlabel("iterations")
  axes[0][0].legend(fontsize=6, ncol=2)
  fig.tight_layout()
  path = os.path.join(args.results, f"dcm_vs_scm_{args.preset}.png")
  os.makedirs(args.results, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--root", required=True)
  ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  ap.add_argument("--jobs", type=int, default=1, help="parallel processes (on a GPU several share the card)")
  ap.add_argument("--patterns", default="c1-1,c2-3")
  ap.add_argument("--objectives", default="dcm,scm,meanflow")
  ap.add_argument("--results", default=os.path.join(common.ROOT, "experiments", "results"))
  ap.add_argument("--teacher", default="", help="an existing rf teacher stage dir to start from (not retrained)")
  ap.add_argument("--report_only", action="store_true", help="only rebuild the table and plot from the runs")
  ap.add_argument("--task", help=argparse.SUPPRESS)
  args = ap.parse_args()
  args.root = os.path.abspath(args.root)
  args.patterns, args.objectives = args.patterns.split(","), args.objectives.split(",")
  args.every_used = PRESETS[args.preset]["every"]
  if args.task:
    return run_task(args.task, args)
  if args.report_only:
    return print(report(args))
  me, logs = os.path.abspath(__file__), os.path.join(args.root, "logs")
  passthrough = ["--root", args.root, "--preset", args.preset, "--teacher", args.teacher]
  common.run_parallel([common.self_command(me, *passthrough, "--task", "teacher")], 1, logs)
  common.run_parallel([common.self_command(me, *passthrough, "--task", f"tf:{p}") for p in args.patterns],
                      args.jobs, logs)
  common.run_parallel([common.self_command(me, *passthrough, "--task", f"curve:{o}:{p}")
                       for p in args.patterns for o in args.objectives], args.jobs, logs)
  print(report(args))


if __name__ == "__main__":
  main()
