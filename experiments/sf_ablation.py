"""SF-DMD ablations at toy scale (issue 5): the initialisation (Causal-rCM Table 5) and the step count and
context (Table 4).

  init   4-step SF-DMD (clean context) from each initialisation: none (the bidirectional teacher's weights),
         DF, TF, TF-KD, TF-dCM, TF-sCM; frame-wise and chunk-wise. Scored at 4 steps.
  steps  SF-DMD from TF-sCM trained and sampled with 1, 2 and 4 steps (the first chunk always takes the 4-step
         schedule at sampling), clean context (extra t=0 cache pass) vs noisy context (the exit step's K/V).
Runs on the root of experiments/dcm_vs_scm.py (same preset): its teacher, TF and final TF-dCM / TF-sCM
checkpoints are the initialisations; DF and TF-KD are trained here with the TF length.

  python experiments/dcm_vs_scm.py --root runs/exp --preset gpu --jobs 6      # first
  python experiments/sf_ablation.py --root runs/exp --preset gpu --jobs 8 --seeds 0,1
Writes experiments/results/sf_init_<preset>.{md,json} and sf_steps_<preset>.{md,json}, plus a plot of each.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import common  # noqa: E402
from experiments.dcm_vs_scm import PRESETS  # noqa: E402

INITS = ("none", "df", "tf", "tf_kd", "tf_dcm", "tf_scm")
SF_ITERS = {"smoke": 2, "cpu": 300, "gpu": 400}
SCHEDULES = {4: (1600 / 1601, 15 / 16, 5 / 6, 5 / 8, 0.0), 2: (1600 / 1601, 5 / 6, 0.0), 1: (1600 / 1601, 0.0)}
METRICS = ("digits/class_accuracy", "digits/frechet")


def _arg(preset, **kw):
  extra = ",".join(f"{k}={v}" for k, v in kw.items())
  return ",".join(a for a in (extra, preset["arg"]) if a)


def _init_dir(root: str, pattern: str, init: str) -> str:
  return {"none": os.path.join(root, "teacher"), "df": os.path.join(root, pattern, "df"),
          "tf": os.path.join(root, pattern, "tf"), "tf_kd": os.path.join(root, pattern, "tf_kd"),
          "tf_dcm": os.path.join(root, pattern, "dcm", "train"),
          "tf_scm": os.path.join(root, pattern, "scm", "train")}[init]


def run_task(task: str, args) -> None:
  preset = PRESETS[args.preset]
  root, data_root = args.root, os.path.join(args.root, "data")
  kind, *rest = task.split(":")
  if kind == "df":
    (pattern,) = rest
    config = common.load_config("causal", _arg(preset, objective="scm", pattern=pattern))
    cfg = common.stage(config, "tf", root, recipe="df", init_from=os.path.join(root, "teacher"),
                       **{"train.num_steps": preset["tf"]})
    common.train(cfg, os.path.join(root, pattern, "df"), data_root)
  elif kind == "kd":
    (pattern,) = rest
    config = common.load_config("causal", _arg(preset, objective="kd", pattern=pattern))
    cfg = common.stage(config, "tf_kd", root, init_from=os.path.join(root, pattern, "tf"),
                       teacher_from=os.path.join(root, "teacher"), **{"train.num_steps": preset["iters"]})
    common.train(cfg, os.path.join(root, pattern, "tf_kd"), data_root)
  elif kind == "sf":
    pattern, init, steps, context, seed = rest
    steps, noisy = int(steps), context == "noisy"
    config = common.load_config("sf_dmd", _arg(preset, pattern=pattern, noisy_context=noisy))
    iters = args.iters or SF_ITERS[args.preset]
    over = {"init_from": _init_dir(root, pattern, init), "teacher_from": os.path.join(root, "teacher"),
            "seed": int(seed), "train.num_steps": iters, "dmd.schedule": SCHEDULES[steps]}
    cfg = common.stage(config, "sf_dmd", root, **over)
    run_dir = os.path.join(root, pattern, "sf", f"{init}_{steps}step_{context}_s{seed}")
    common.train(cfg, os.path.join(run_dir, "train"), data_root)
    ecfg = common.stage(config, "eval_sf", root, seed=int(seed), **{
        "eval.checkpoint": os.path.join(run_dir, "train"), "eval.steps": (steps,),
        "eval.num_videos": preset["eval_videos"], "eval.batch_size": preset["eval_videos"]})
    common.evaluate(ecfg, os.path.join(run_dir, "eval"), data_root)
  else:
    raise SystemExit(f"unknown task {task!r}")


def _runs(args):
  init_runs = [(p, i, 4, "clean", s) for p in args.patterns for i in args.inits for s in args.seeds]
  step_runs = [(p, "tf_scm", n, c, s) for p in args.step_patterns for n in args.steps for c in ("clean", "noisy")
               for s in args.seeds]
  return init_runs, step_runs


def _collect(args, runs):
  out = {}
  for pattern, init, steps, context, seed in runs:
    path = os.path.join(args.root, pattern, "sf", f"{init}_{steps}step_{context}_s{seed}", "eval", "metrics.json")
    res = common.read_json(path)
    (row,) = res["rows"].values()
    out.setdefault((pattern, init, steps, context), []).append(row)
    out.setdefault("calibration", res["calibration"])
  return out


def _cell(rows, metric):
  vals = [r[metric] for r in rows]
  if len(vals) == 1:
    return f"{vals[0]:.3f}"
  return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def _table(res, keys, label_fn, header):
  lines = ["| " + " | ".join(header + [m.split("/")[1] for m in METRICS]) + " |",
           "|" + "---|" * (len(header) + len(METRICS))]
  for key in keys:
    lines.append("| " + " | ".join(label_fn(key) + [_cell(res[key], m) for m in METRICS]) + " |")
  cal = res["calibration"]
  lines += ["", "Calibration (same conditions): " + "; ".join(
      f"{m}: floor {cal['floor'][m]:.3f}, ceiling {cal['ceiling'][m]:.3f}" for m in METRICS)]
  return "\n".join(lines)


def _plot(res, keys, xlabels, title, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(METRICS), figsize=(5.5 * len(METRICS), 3.6), squeeze=False)
  for ax, metric in zip(axes[0], METRICS):
    for j, group in enumerate(sorted({k[0] for k in keys})):
      ks = [k for k in keys if k[0] == group]
      means = [statistics.mean(r[metric] for r in res[k]) for k in ks]
      xs = [x + 0.35 * j for x in range(len(ks))]
      ax.bar(xs, means, width=0.35, label=group)
      for x, k in zip(xs, ks):
        ax.scatter([x] * len(res[k]), [r[metric] for r in res[k]], color="k", s=6, zorder=3)
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=30, fontsize=7)
    ax.axhline(res["calibration"]["ceiling"][metric], color="g", lw=0.8, label="ceiling")
    ax.axhline(res["calibration"]["floor"][metric], color="r", lw=0.8, label="floor")
    if metric.endswith("frechet"):   # the floor is ~30x the spread between runs: a log axis keeps both visible
      ax.set_yscale("log")
    ax.set_title(f"{title}: {metric}", fontsize=9)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def report(args) -> None:
  init_runs, step_runs = _runs(args)
  env = common.environment()
  cmd = (f"python experiments/sf_ablation.py --root {os.path.relpath(args.root, common.ROOT)} --preset {args.preset} --jobs {args.jobs} "
         f"--seeds {','.join(args.seeds)} --patterns {','.join(args.patterns)} --step_patterns "
         f"{','.join(args.step_patterns)} --inits {','.join(args.inits)} --steps {','.join(map(str, args.steps))}"
         + (f" --iters {args.iters}" if args.iters else ""))
  os.makedirs(args.results, exist_ok=True)
  res = _collect(args, init_runs)
  keys = sorted({r[:4] for r in init_runs}, key=lambda k: (k[0], INITS.index(k[1])))
  table = _table(res, keys, lambda k: [k[0], k[1]], ["pattern", "init"])
  base = f"sf_init_{args.preset}"
  with open(os.path.join(args.results, base + ".md"), "w") as f:
    f.write(f"# SF-DMD initialisation ablation (4-step, clean context; {env})\n\n{args.iters or SF_ITERS[args.preset]} SF-DMD "
            f"iterations per run, seeds {','.join(args.seeds)} (mean ± std over seeds).\n\nCommand: `{cmd}`\n\n"
            f"{table}\n\nPlot: {base}.png\n")
  _plot(res, keys, [k[1] for k in keys if k[0] == keys[0][0]], "SF-DMD init", os.path.join(args.results, base + ".png"))
  common.write_json(os.path.join(args.results, base + ".json"), {"/".join(map(str, k)): res[k] for k in keys})
  print(table)
  if step_runs:
    res = _collect(args, step_runs)
    keys = sorted({r[:4] for r in step_runs})
    table = _table(res, keys, lambda k: [k[0], str(k[2]), k[3]], ["pattern", "steps", "context"])
    base = f"sf_steps_{args.preset}"
    with open(os.path.join(args.results, base + ".md"), "w") as f:
      f.write(f"# SF-DMD steps and context ablation (init TF-sCM; {env})\n\nTrained and sampled with the same "
              f"step count (first chunk: 4 steps at sampling); {args.iters or SF_ITERS[args.preset]} iterations per run, seeds "
              f"{','.join(args.seeds)}.\n\nCommand: `{cmd}`\n\n{table}\n\nPlot: {base}.png\n")
    _plot(res, keys, [f"{k[2]}-step {k[3]}" for k in keys if k[0] == keys[0][0]], "SF-DMD steps/context",
          os.path.join(args.results, base + ".png"))
    common.write_json(os.path.join(args.results, base + ".json"), {"/".join(map(str, k)): res[k] for k in keys})
    print(table)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--root", required=True)
  ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  ap.add_argument("--jobs", type=int, default=1)
  ap.add_argument("--patterns", default="c1-1,c2-3")
  ap.add_argument("--step_patterns", default="c2-3", help="patterns of the steps/context ablation ('' = none)")
  ap.add_argument("--seeds", default="0")
  ap.add_argument("--iters", type=int, default=0, help="SF-DMD iterations per run (0: the preset's)")
  ap.add_argument("--inits", default=",".join(INITS), help="initialisations of the init ablation")
  ap.add_argument("--steps", default="1,2,4", help="step counts of the steps/context ablation")
  ap.add_argument("--results", default=os.path.join(common.ROOT, "experiments", "results"))
  ap.add_argument("--task", help=argparse.SUPPRESS)
  args = ap.parse_args()
  args.root = os.path.abspath(args.root)
  args.patterns = args.patterns.split(",")
  args.step_patterns = [p for p in args.step_patterns.split(",") if p]
  args.seeds = args.seeds.split(",")
  args.inits, args.steps = args.inits.split(","), [int(n) for n in args.steps.split(",")]
  unknown = [i for i in args.inits if i not in INITS] + [n for n in args.steps if n not in SCHEDULES]
  if unknown:
    raise SystemExit(f"--inits takes {INITS}, --steps takes {sorted(SCHEDULES)}; unknown: {unknown}")
  if args.task:
    return run_task(args.task, args)
  for p in args.patterns + args.step_patterns:
    for need in ("teacher", f"{p}/tf", f"{p}/scm/train", f"{p}/dcm/train"):
      if not os.path.exists(os.path.join(args.root, need, "metrics.json")):
        raise SystemExit(f"{args.root}/{need} is missing: run experiments/dcm_vs_scm.py --root {args.root} "
                         f"--preset {args.preset} first.")
  me, logs = os.path.abspath(__file__), os.path.join(args.root, "logs_sf")
  passthrough = ["--root", args.root, "--preset", args.preset, "--iters", str(args.iters)]
  prefix = [f"{k}:{p}" for p in args.patterns for k, init in (("df", "df"), ("kd", "tf_kd")) if init in args.inits]
  common.run_parallel([common.self_command(me, *passthrough, "--task", t) for t in prefix], args.jobs, logs)
  init_runs, step_runs = _runs(args)
  tasks = list(dict.fromkeys(":".join(map(str, r)) for r in init_runs + step_runs))
  common.run_parallel([common.self_command(me, *passthrough, "--task", f"sf:{t}") for t in tasks], args.jobs, logs)
  report(args)


if __name__ == "__main__":
  main()
