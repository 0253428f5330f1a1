"""The quickstart recipe: teacher -> samples -> metrics on a toy world, end to end on a laptop CPU.

  python -m rcm_jax.main recipe --config=configs/toy/quickstart.py --workdir=runs/quickstart
Arguments: world=moving_digits|camera_pan, runlocal (seconds; what the tests run).
Stages (each in <workdir>/<stage>): teacher (rf training), samples (16-step CFG samples of the teacher's
EMA), metrics (the teacher at 4/8/16/50 steps beside the real-data ceiling and the untrained floor).
Later issues append TF, TF-CM and SF-DMD stages to `stage_order`.
"""
import ml_collections

from rcm_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, world="moving_digits", runlocal=False)
  c = config_lib.toy_base(arg)
  c.stages = ml_collections.ConfigDict()
  c.stages.teacher = dict(command="train", recipe="rf")
  c.stages.samples = dict(command="sample", source="teacher")
  c.stages.metrics = dict(command="eval", source="teacher")
  c.stage_order = ("teacher", "samples", "metrics")
  return c
