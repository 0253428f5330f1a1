"""Bidirectional rectified-flow teacher on a toy world: one `train` stage.

  python -m rcm_jax.main train --config=configs/toy/teacher.py --workdir=runs/teacher_digits
  python -m rcm_jax.main train --config=configs/toy/teacher.py:world=camera_pan --workdir=runs/teacher_pan
  python -m rcm_jax.main eval  --config=configs/toy/teacher.py --workdir=runs/teacher_digits
Arguments: world=moving_digits|camera_pan, runlocal (tiny model, a few steps: a smoke test).
"""
from rcm_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, world="moving_digits", runlocal=False)
  return config_lib.toy_base(arg)
