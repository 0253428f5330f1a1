"""Causal-rCM end to end on a toy world: teacher -> TF -> TF-sCM -> SF-DMD -> eval (Causal-rCM sections 4, 6).

  python -m rcm_jax.main recipe --config=configs/toy/sf_dmd.py --workdir=runs/sf_dmd
  python -m rcm_jax.main recipe --config=configs/toy/sf_dmd.py:pattern=c2-3,noisy_context --workdir=runs/sf_dmd_c23
  python -m rcm_jax.main recipe --config=configs/toy/sf_dmd.py:runlocal --workdir=/tmp/sf_dmd_smoke
  python -m rcm_jax.main recipe --config=configs/toy/sf_dmd.py:joint=0.01 --workdir=runs/rcm_joint
Arguments: those of configs/toy/causal.py (world, pattern, data, runlocal; the TF-CM objective is sCM) plus
noisy_context (SF-DMD rollout and eval write the last step's K/V instead of an extra t=0 pass),
critic_steps (fake-score updates per student update; paper: 5) and joint=<lambda> (> 0: the joint rCM ablation,
TF-sCM + lambda SF-DMD in one stage `rcm_joint` from tf instead of the tf_scm and sf_dmd stages; 0: stages apart).
Stages: the teacher, tf, tf_scm and eval_* stages of configs/toy/causal.py, then
  sf_dmd        SF-DMD, init_from tf_scm, teacher_from teacher (bidirectional, CFG teacher.cfg_scale; paper 5),
                the fake-score critic initialised from the teacher, its own optimizer optim_critic
  eval_sf       the SF-DMD student (EMA), KV-cache rollout sampler, 1/2/4 steps, no CFG
With joint=<lambda>: teacher, tf, rcm_joint (recipe rcm_joint, init_from tf; the TF-sCM term distils the causal tf
stage, scm_teacher_from, the DMD term the bidirectional teacher), eval_teacher, eval_tf, eval_sf (of rcm_joint).
Paper (Table 3): student lr 2e-6, critic 4e-7, betas (0, 0.999), 1k-3.2k iterations; toy rates are larger.
"""
import importlib.util
import os

import ml_collections

from rcm_jax import config_lib


def _causal_config(arg: str):
  spec = importlib.util.spec_from_file_location("_toy_causal", os.path.join(os.path.dirname(__file__), "causal.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, world="moving_digits", pattern="c1-1", data="real", noisy_context=False,
                             critic_steps=5, joint=0.0, runlocal=False)
  if arg.joint < 0:
    raise ValueError(f"joint={arg.joint}: lambda must be >= 0 (0 = TF-sCM and SF-DMD as separate stages).")
  c = _causal_config(f"world={arg.world},objective=scm,pattern={arg.pattern},data={arg.data},"
                     f"runlocal={arg.runlocal}")
  steps = 300 if not arg.runlocal else 2
  c.stages.sf_dmd = dict(
      command="train", recipe="sf_dmd", init_from="tf_scm", teacher_from="teacher",
      teacher=dict(kind="bidirectional", cfg_scale=3.0),   # paper: CFG 5 with the 14B teacher
      dmd=dict(schedule=(1600 / 1601, 15 / 16, 5 / 6, 5 / 8, 0.0), critic_steps=arg.critic_steps, time_shift=5.0,
               noisy_context=arg.noisy_context, cache_keys="post_rope", cache_frames=0, replay_backprop=False),
      optim=dict(lr=5e-5, b1=0.0, b2=0.999, weight_decay=0.0, warmup_steps=min(100, steps // 2), clip_norm=0.0),
      optim_critic=dict(lr=2e-5, b1=0.0, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=min(100, steps // 2),
                        mu_dtype="float32"),
      train=dict(num_steps=steps, sample_at_end=False, ckpt_every=max(steps // 4, 1)),
      diffusion=dict(p_uncond=0.0))
  stage = "sf_dmd"
  if arg.joint > 0:   # one stage: TF-sCM on the data (teacher: tf) + lambda SF-DMD (teacher: the bidirectional one)
    stage = "rcm_joint"
    c.stages.rcm_joint = c.stages.sf_dmd
    del c.stages["sf_dmd"]
    c.stages.rcm_joint.update(dict(recipe="rcm_joint", init_from="tf", scm_teacher_from="tf",
                                   rcm=dict(dmd_weight=arg.joint)))
    c.stage_order = tuple(s for s in c.stage_order if s not in ("tf_scm", "eval_cm"))
  c.stages.eval_sf = dict(command="eval", source=stage,
                          eval=dict(label=stage, sampler="rollout", solver="consistency", cfg_scale=1.0,
                                    steps=(1, 2, 4) if not arg.runlocal else (1, 2),
                                    noisy_context=arg.noisy_context, cache_keys="post_rope", cache_frames=0))
  c.stage_order = tuple(c.stage_order) + (stage, "eval_sf")
  return c
