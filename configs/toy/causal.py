"""Causal-rCM teacher-forcing recipe on a toy world: teacher -> TF -> TF-CM (sCM or dCM) -> metrics.

  python -m rcm_jax.main recipe --config=configs/toy/causal.py --workdir=runs/causal_scm
  python -m rcm_jax.main recipe --config=configs/toy/causal.py:objective=dcm --workdir=runs/causal_dcm
  python -m rcm_jax.main recipe --config=configs/toy/causal.py:data=teacher --workdir=runs/causal_scm_teacher
  python -m rcm_jax.main recipe --config=configs/toy/causal.py:runlocal --workdir=/tmp/causal_smoke
Arguments: world=moving_digits|camera_pan, objective=scm|dcm|meanflow|kd (the TF-CM / distillation stage),
pattern=cA-B (first chunk A latent frames, then chunks of B; the toy worlds have 8 frames: c1-1 frame-wise,
c2-2 or c2-3 chunk-wise), data=real|teacher (what TF and TF-CM train on: the world's videos, or, as in the
paper, only the teacher's CFG samples for the same conditions), runlocal (tiny model, a few steps: a smoke test).
Stages (each in <workdir>/<stage>):
  teacher       bidirectional rectified flow (rf)
  generate      data=teacher only: the teacher's samples (generate.steps Euler steps, CFG generate.cfg_scale)
                for every train-split condition, in <workdir>/data/<world>_teacher_generate
  tf            TF diffusion, init_from teacher (Causal-rCM section 4; UniformShift(5), bell weight)
  tf_<obj>      TF-sCM / TF-dCM / TF-MeanFlow (init_from tf, causal teacher_from tf) or TF-KD (teacher_from
                teacher, the bidirectional ODE)
  eval_teacher  the teacher, bidirectional sampler, 4/8/16/50 steps, CFG
  eval_tf       the TF model, causal chunk-by-chunk Euler sampler, CFG
  eval_cm       the distilled student, causal few-step sampler (1/2/4 steps, no CFG)
Paper hyper-parameters (Table 3) are the recipes' defaults; toy-scale learning rates and lengths are set here.
"""
import ml_collections

from rcm_jax import config_lib

OBJECTIVES = {"scm": "tf_scm", "dcm": "tf_dcm", "meanflow": "tf_meanflow", "kd": "tf_kd"}


def _pattern(spec: str):
  try:
    a, b = spec.lstrip("c").split("-")
    return int(a), int(b)
  except ValueError:
    raise ValueError(f"pattern={spec!r}: write cA-B, e.g. c1-1 (frame-wise) or c2-3.") from None


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, world="moving_digits", objective="scm", pattern="c1-1", data="real",
                             runlocal=False)
  if arg.objective not in OBJECTIVES:
    raise ValueError(f"objective={arg.objective!r}: choose one of {sorted(OBJECTIVES)}.")
  if arg.data not in ("real", "teacher"):
    raise ValueError(f"data={arg.data!r}: choose real (the world's videos) or teacher (the teacher's samples).")
  c = config_lib.toy_base(arg)
  first, chunk = _pattern(arg.pattern)

  c.causal = ml_collections.ConfigDict(dict(first_chunk_frames=first, chunk_frames=chunk, local_blocks=0,
                                            sink_blocks=0))
  c.teacher_from = ""                        # a stage name in stages.*; the runner resolves it to its dir
  c.teacher = ml_collections.ConfigDict(dict(kind="", cfg_scale=2.0, use_ema=True))   # paper: CFG 3
  c.tf = ml_collections.ConfigDict(dict(time_sampler="uniform_shift", time_sampler_kwargs=dict(shift_s=5.0),
                                        weight="bell", context_times=()))
  c.dcm = ml_collections.ConfigDict(dict(num_steps=48, shift=3.0, target="student", loss_scale=100.0))
  c.scm = ml_collections.ConfigDict(dict(time_mean=-0.8, time_std=1.6, warmup_steps=100, norm_eps=0.1,
                                         loss_scale=100.0, max_xla_tokens=16384))
  c.meanflow = ml_collections.ConfigDict(dict(velocity="teacher", p_interval=0.25))
  c.kd = ml_collections.ConfigDict(dict(knots=(1600 / 1601, 15 / 16, 5 / 6, 5 / 8, 0.0), substeps=4,
                                        loss_scale=1.0))
  for job in ("eval", "sample", "generate"):  # picked by the eval / sample / generate jobs: bidirectional | causal
    c[job].sampler = "bidirectional"
    c[job].solver = "euler"                  # causal sampler: "euler" (diffusion) | "consistency" (few-step)
    c[job].noisy_context = False
    c[job].average_velocity = False          # causal sampler: TF-MeanFlow students are called as u(z, 0, t)
  # streaming (sample.sampler="rollout": rcm_jax/play/stream_job.py) and the play server (rcm_jax/play/server.py)
  c.sample.update(dict(cache_keys="post_rope", cache_frames=0, num_frames=0, kv_cache_dtype="float32",
                       no_kv_cache=False, actions=""))
  c.play = ml_collections.ConfigDict(dict(max_frames=512, image_index=0, fps=8.0, local_blocks=4, sink_blocks=1))

  steps = dict(tf=1000, cm=500) if not arg.runlocal else dict(tf=4, cm=4)
  cm_name = OBJECTIVES[arg.objective]
  distill_optim = dict(lr=2e-4, b1=0.0, b2=0.999, weight_decay=0.0, warmup_steps=min(100, steps["cm"] // 2),
                       clip_norm=0.0)   # paper: lr 2e-6, betas (0, 0.999), no clipping
  c.stages = ml_collections.ConfigDict()
  c.stages.teacher = dict(command="train", recipe="rf")
  c.stages.tf = dict(command="train", recipe="tf", init_from="teacher", train=dict(num_steps=steps["tf"],
                     sample_at_end=False), optim=dict(lr=5e-4, warmup_steps=min(100, steps["tf"] // 2)))
  cm_stage = dict(command="train", recipe=cm_name, init_from="tf", teacher_from="tf",
                  train=dict(num_steps=steps["cm"], sample_at_end=False), optim=distill_optim,
                  diffusion=dict(p_uncond=0.0))
  if arg.objective == "kd":   # ODE pairs from the bidirectional teacher
    cm_stage.update(teacher_from="teacher", teacher=dict(kind="bidirectional"))
  c.stages[cm_name] = cm_stage
  if arg.data == "teacher":   # TF and TF-CM read only teacher samples; evaluation stays on the real test split
    c.stages.generate = dict(command="generate", source="teacher")
    for name in ("tf", cm_name):
      c.stages[name].data = dict(source="teacher", teacher_from="generate")
  c.stages.eval_teacher = dict(command="eval", source="teacher")
  c.stages.eval_tf = dict(command="eval", source="tf",
                          eval=dict(label="TF", sampler="causal", solver="euler",
                                    steps=(4, 8, 16) if not arg.runlocal else (2,)))
  c.stages.eval_cm = dict(command="eval", source=cm_name,
                          eval=dict(label=cm_name, sampler="causal", solver="consistency", cfg_scale=1.0,
                                    steps=(1, 2, 4), average_velocity=arg.objective == "meanflow"))
  c.stage_order = ("teacher",) + (("generate",) if arg.data == "teacher" else ()) + (
      "tf", cm_name, "eval_teacher", "eval_tf", "eval_cm")
  return c
