"""Bidirectional rCM on a toy world: teacher -> rCM (TrigFlow sCM + lambda DMD, one stage) -> metrics.

  python -m rcm_jax.main recipe --config=configs/toy/rcm_bidirectional.py --workdir=runs/rcm_bidirectional
  python -m rcm_jax.main recipe --config=configs/toy/rcm_bidirectional.py:dmd_weight=0.1 --workdir=runs/rcm_l01
  python -m rcm_jax.main recipe --config=configs/toy/rcm_bidirectional.py:runlocal --workdir=/tmp/rcm_smoke
Arguments: world=moving_digits|camera_pan, dmd_weight (lambda of the DMD term; rCM: 0.01), critic_steps (fake-score
updates per student update; paper: 5), runlocal (tiny model, a few steps: a smoke test).
Stages (each in <workdir>/<stage>):
  teacher       bidirectional rectified flow (rf), as configs/toy/teacher.py
  rcm           recipe rcm_bidirectional, init_from teacher, teacher_from teacher (CFG teacher.cfg_scale): the
                TrigFlow sCM loss on the data plus lambda times the DMD loss on the student's few-step samples
                (dmd.schedule, exit step cycling), the fake-score critic initialised from the teacher
  eval_teacher  the teacher, 4/8/16/50 Euler steps, CFG
  eval_rcm      the rCM student (EMA), bidirectional sampler at 1/2/4 steps, no CFG (Euler on a consistency model
                is the deterministic multistep consistency sampler: x0 = x - t v, re-noised along the same line)
"""
import ml_collections

from rcm_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, world="moving_digits", dmd_weight=0.01, critic_steps=5, runlocal=False)
  if not arg.dmd_weight > 0:
    raise ValueError(f"dmd_weight={arg.dmd_weight}: lambda must be > 0 (rCM: 0.01).")
  c = config_lib.toy_base(arg)
  steps = 500 if not arg.runlocal else 2
  c.stages = ml_collections.ConfigDict()
  c.stages.teacher = dict(command="train", recipe="rf")
  c.stages.rcm = dict(
      command="train", recipe="rcm_bidirectional", init_from="teacher", teacher_from="teacher",
      teacher=dict(kind="bidirectional", cfg_scale=2.0, use_ema=True),   # paper: CFG 3 (sCM), 5 (DMD)
      scm=dict(time_mean=-0.8, time_std=1.6, warmup_steps=min(100, steps // 2), norm_eps=0.1, loss_scale=100.0),
      rcm=dict(dmd_weight=arg.dmd_weight),
      dmd=dict(schedule=(1600 / 1601, 15 / 16, 5 / 6, 5 / 8, 0.0), critic_steps=arg.critic_steps, time_shift=5.0),
      optim=dict(lr=2e-4, b1=0.0, b2=0.999, weight_decay=0.0, warmup_steps=min(100, steps // 2), clip_norm=0.0),
      optim_critic=dict(lr=2e-5, b1=0.0, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=min(100, steps // 2),
                        mu_dtype="float32"),
      train=dict(num_steps=steps, sample_at_end=False, ckpt_every=max(steps // 4, 1)),
      diffusion=dict(p_uncond=0.0))
  c.stages.eval_teacher = dict(command="eval", source="teacher")
  c.stages.eval_rcm = dict(command="eval", source="rcm",
                           eval=dict(label="rcm_bidirectional", sampler="bidirectional", cfg_scale=1.0,
                                     steps=(1, 2, 4) if not arg.runlocal else (1, 2)))
  c.stage_order = ("teacher", "rcm", "eval_teacher", "eval_rcm")
  return c
