"""The recipe runner: a chain of stages, each one a train / sample / eval / generate job in its own sub-workdir.

A recipe config holds the shared sections (world, data, model, diffusion, ...) plus
`stages.<name>` (the stage's command and the keys it overrides) and `stage_order`. A train stage with
`init_from: <earlier stage>` starts from that stage's checkpoint; sample, eval and generate stages read
`source: <stage>`; `data.teacher_from: <generate stage>` trains on that stage's teacher samples. Finished
stages are skipped, unfinished ones resume, so re-running the command after an interruption continues
where it stopped. All stages share one data directory.
"""
from __future__ import annotations

import json
import os

import ml_collections
from absl import logging

from rcm_jax.errors import UserError
from rcm_jax.training import generate, jobs, trainer

COMMANDS = ("train", "sample", "eval", "generate", "report")


def stage_config(config, name: str, workdir: str) -> ml_collections.ConfigDict:
  """The resolved config of one stage: shared sections updated by the stage's own keys."""
  if name not in config.stages:
    raise UserError(f"stage_order names {name!r}, but config.stages has only {sorted(config.stages)}.")
  stage = config.stages[name]
  if stage.command not in COMMANDS:
    raise UserError(f"stages.{name}.command={stage.command!r}: choose one of {COMMANDS}.")
  base = ml_collections.ConfigDict(config.to_dict())
  for key in ("stages", "stage_order"):
    del base[key]
  with base.unlocked():
    for key, value in stage.items():
      if key in ("command", "source", "sources"):
        continue
      if isinstance(value, ml_collections.ConfigDict) and key in base:
        base[key].update(value.to_dict())
      else:
        base[key] = value
    refs = [(base, k, k) for k in base if k.endswith("_from")]   # init_from, teacher_from, ...: stage names
    refs += [(base[s], k, f"{s}.{k}") for s in base if isinstance(base[s], ml_collections.ConfigDict)
             for k in base[s] if k.endswith("_from")]              # data.teacher_from
    for section, key, ref_key in refs:
      if isinstance(section[key], str) and section[key] and os.sep not in section[key]:   # a path stays a path
        if section[key] not in config.stages:
          raise UserError(f"stages.{name}.{ref_key}={section[key]!r} is not a stage (nor a path); "
                           f"stages: {sorted(config.stages)}.")
        section[key] = os.path.join(workdir, section[key])
    if stage.get("source"):
      for job in ("sample", "eval", "generate"):
        if job in base:
          base[job].checkpoint = os.path.join(workdir, stage.source)
  return base


def _done(stage_dir: str, cfg, command: str) -> bool:
  path = os.path.join(stage_dir, "metrics.json")
  if not os.path.exists(path):
    return False
  if command == "report":   # cheap, and its inputs may have changed: always rebuilt
    return False
  if command != "train":
    return True
  with open(path) as f:
    return json.load(f).get("step", -1) >= cfg.train.num_steps


def report(config, name: str, workdir: str) -> dict:
  """A `report` stage: one table of every model scored by the eval stages in `stages.<name>.sources`, one line
  per model and sampler setting, with its NFE and samples/s, between the first source's floor and ceiling."""
  from rcm_jax.evaluation.report import format_model_table
  rows, extra, calibration = {}, {}, None
  for src in config.stages[name].sources:
    with open(os.path.join(workdir, src, "metrics.json")) as f:
      result = json.load(f)
    calibration = calibration or result["calibration"]
    speed = result.get("samples_per_s", {})
    for label, metrics in result["rows"].items():
      model, _, nfe = label.rpartition(" (")
      rows[model] = metrics
      extra[model] = {"NFE": nfe.rstrip(")"), "samples/s": f"{speed[label]:.1f}" if label in speed else ""}
  table = format_model_table(rows, calibration, extra)
  out_dir = os.path.join(workdir, name)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(table + "\n")
  print(f"\n== {name}: every model of this recipe on the held-out conditions\n{table}\n", flush=True)
  return {"table": os.path.join(out_dir, "table.md"), "rows": rows, "calibration": calibration}


def run_recipe(config, workdir: str) -> dict:
  order = list(config.stage_order)
  for name in order:   # check every stage before running any
    stage_config(config, name, workdir)
    if config.stages[name].command == "report":
      missing = [s for s in config.stages[name].get("sources", ()) if s not in order[:order.index(name)]]
      if missing or not config.stages[name].get("sources"):
        raise UserError(f"stages.{name}.sources={tuple(config.stages[name].get('sources', ()))}: list eval "
                         f"stages that run before it in stage_order (not found earlier: {missing}).")
  data_root = os.path.join(workdir, "data")
  results = {}
  for i, name in enumerate(order):
    cfg = stage_config(config, name, workdir)
    command = config.stages[name].command
    stage_dir = os.path.join(workdir, name)
    if _done(stage_dir, cfg, command):
      logging.info("Stage %d/%d %s: done, skipped.", i + 1, len(order), name)
      with open(os.path.join(stage_dir, "metrics.json")) as f:
        results[name] = json.load(f)
      continue
    print(f"== stage {i + 1}/{len(order)}: {name} ({command})", flush=True)
    if command == "report":
      results[name] = report(config, name, workdir)
      continue
    fn = {"train": trainer.train, "sample": jobs.sample, "eval": jobs.evaluate, "generate": generate.generate}[command]
    results[name] = fn(cfg, stage_dir, data_root=data_root)
    if command == "train" and "interrupted_at" in results[name]:
      print(f"Interrupted in stage {name}; run the same command to resume.")
      return results
  print(f"\nRecipe done. Everything is under {workdir}:")
  for name in order:
    stage_dir = os.path.join(workdir, name)
    print(f"  {name:12s} {stage_dir}/metrics.json")
    for extra in ("samples", "table.md", "metrics_vs_steps.png", "tb"):
      p = os.path.join(stage_dir, extra)
      if os.path.exists(p):
        print(f"  {'':12s} {p}")
  return results
