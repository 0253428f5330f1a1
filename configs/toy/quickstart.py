"""The quickstart recipe: the whole of Causal-rCM on a toy world, end to end on a laptop CPU.

  python -m rcm_jax.main recipe --config=configs/toy/quickstart.py --workdir=runs/quickstart
Arguments: world=moving_digits|camera_pan, runlocal (seconds; what the tests run), patterns (the student block
patterns, '+'-separated; default c1-1+c2-3 = frame-wise and chunk-wise), objective=scm|dcm (the TF-CM stage:
TF-sCM, or TF-dCM on the 48-step grid), teacher_only (the first two stages).
Stages (each in <workdir>/<stage>):
  teacher           bidirectional rectified-flow teacher (rf)
  eval_teacher      the teacher at 4/8/16/50 Euler steps with CFG
  then per block pattern P (c11 = frame-wise c1-1, c23 = chunk-wise c2-3: 2 frames, then chunks of 3):
  tf_P              TF diffusion from the teacher
  tf_scm_P          TF-sCM from TF (the causal teacher TF, jax.jvp through the network); tf_dcm_P with objective=dcm
  sf_dmd_P          SF-DMD from TF-sCM (or TF-dCM): KV-cache rollouts, the bidirectional teacher with CFG, fake-score critic
  eval_scm_P        the TF-sCM student (eval_dcm_P: TF-dCM), 1/2/4 steps (causal sampler, no cache)
  eval_sf_P         the SF-DMD student, 1/2/4 steps (KV-cache rollout)
  report            one table: every model above with NFE, toy metrics and samples/s, floor and ceiling
Stage lengths (LENGTHS) and the SF-DMD critic ratio (CRITIC_STEPS = 2) are below configs/toy/sf_dmd.py's so the
chain fits a laptop; every other setting of each stage is that of configs/toy/causal.py and sf_dmd.py.
"""
import importlib.util
import os

import ml_collections

from rcm_jax import config_lib

LENGTHS = dict(tf=300, tf_scm=200, sf_dmd=100)   # training steps per stage (the teacher: toy_base's 1500)
CRITIC_STEPS = 2   # fake-score updates per SF-DMD student update (paper and configs/toy/sf_dmd.py: 5); 1 in runlocal


def _toy_config(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(f"_toy_{name}", os.path.join(os.path.dirname(__file__), f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _sf_dmd_config(arg: str):
  return _toy_config("sf_dmd", arg)


def _causal_config(arg: str):
  return _toy_config("causal", arg)


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, world="moving_digits", runlocal=False, patterns="c1-1+c2-3", objective="scm",
                             teacher_only=False)
  if arg.objective not in ("scm", "dcm"):
    raise ValueError(f"objective={arg.objective!r}: choose scm (TF-sCM) or dcm (TF-dCM).")
  if arg.teacher_only:
    c = config_lib.toy_base(arg)
    c.stages = ml_collections.ConfigDict()
    c.stages.teacher = dict(command="train", recipe="rf")
    c.stages.eval_teacher = dict(command="eval", source="teacher")
    c.stage_order = ("teacher", "eval_teacher")
    return c
  patterns = [p for p in arg.patterns.split("+") if p]
  c = None
  order, evals = ["teacher", "eval_teacher"], ["eval_teacher"]
  for pattern in patterns:
    sub = _sf_dmd_config(f"world={arg.world},pattern={pattern},runlocal={arg.runlocal}")
    if arg.objective == "dcm":   # the TF-CM stage of configs/toy/causal.py:objective=dcm in place of tf_scm
      dcm = _causal_config(f"world={arg.world},objective=dcm,pattern={pattern},runlocal={arg.runlocal}")
      with sub.unlocked():
        sub.stages.tf_scm = dcm.stages.tf_dcm
        sub.stages.eval_cm = dcm.stages.eval_cm
    if c is None:   # shared sections and the teacher stages from the first pattern's config
      c = sub
      stages = ml_collections.ConfigDict()
      stages.teacher = sub.stages.teacher
      stages.eval_teacher = sub.stages.eval_teacher
    tag = pattern.replace("-", "")
    first, chunk = sub.causal.first_chunk_frames, sub.causal.chunk_frames
    layout = dict(causal=dict(first_chunk_frames=first, chunk_frames=chunk))
    cm = f"tf_{arg.objective}"
    rename = {"tf": f"tf_{tag}", "tf_scm": f"{cm}_{tag}", "tf_dcm": f"{cm}_{tag}", "sf_dmd": f"sf_dmd_{tag}",
              "teacher": "teacher"}
    for name in ("tf", "tf_scm", "sf_dmd"):
      stage = sub.stages[name].to_dict()
      for key in ("init_from", "teacher_from"):
        if stage.get(key):
          stage[key] = rename[stage[key]]
      if not arg.runlocal:
        stage.setdefault("train", {})["num_steps"] = LENGTHS[name]
        if "optim" in stage:
          stage["optim"]["warmup_steps"] = min(stage["optim"].get("warmup_steps", 100), LENGTHS[name] // 4)
        if "optim_critic" in stage:
          stage["optim_critic"]["warmup_steps"] = min(stage["optim_critic"].get("warmup_steps", 100),
                                                      LENGTHS[name] // 4)
      if name == "sf_dmd":   # fewer critic steps keep the laptop run short (runlocal: 1, compiles faster)
        stage["dmd"] = {**stage["dmd"], "critic_steps": 1 if arg.runlocal else CRITIC_STEPS}
      stages[rename[name]] = {**stage, **layout}
    cm_label = {"scm": "TF-sCM", "dcm": "TF-dCM"}[arg.objective]
    for name, src, label in (("eval_cm", "tf_scm", cm_label), ("eval_sf", "sf_dmd", "SF-DMD")):
      stage = sub.stages[name].to_dict()
      stage["source"] = rename[src]
      stage["eval"] = {**stage["eval"], "label": f"{label} {pattern}", "steps": (1, 2, 4) if not arg.runlocal else (1, 2)}
      stages[f"{name.replace('eval_cm', 'eval_' + arg.objective)}_{tag}"] = {**stage, **layout}
    order += [f"tf_{tag}", f"{cm}_{tag}", f"sf_dmd_{tag}", f"eval_{arg.objective}_{tag}", f"eval_sf_{tag}"]
    evals += [f"eval_{arg.objective}_{tag}", f"eval_sf_{tag}"]
  stages.eval_teacher = dict(command="eval", source="teacher",
                             eval=dict(label="teacher", steps=(4, 8, 16, 50) if not arg.runlocal else (1, 2)))
  stages.report = dict(command="report", sources=tuple(evals))
  c.stages = stages
  c.stage_order = tuple(order) + ("report",)
  return c
