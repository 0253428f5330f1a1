"""Multi-host start-up: `jax.distributed.initialize` from the environment, before any JAX computation.

Explicit variables win: COORDINATOR_ADDRESS (or JAX_COORDINATOR_ADDRESS) = host:port of process 0,
NUM_PROCESSES, PROCESS_ID (and optionally LOCAL_DEVICE_IDS, comma-separated). Otherwise a SLURM job with
more than one task lets JAX read SLURM's own variables. A plain single process initializes nothing.
CPU processes exchange their collectives through gloo (`jax_cpu_collectives_implementation`), so several
CPU-only processes (tests/test_multihost.py: two on localhost) train together like GPU hosts.
"""
from __future__ import annotations

import os
from typing import Mapping

import jax

from rcm_jax.errors import UserError


class DistributedError(UserError):
  pass


def init_args(env: Mapping[str, str]) -> dict | None:
  """The kwargs of `jax.distributed.initialize` the environment asks for; None for a single process."""
  address = env.get("COORDINATOR_ADDRESS") or env.get("JAX_COORDINATOR_ADDRESS")
  if address:
    missing = [k for k in ("NUM_PROCESSES", "PROCESS_ID") if not env.get(k)]
    if missing:
      raise DistributedError(f"COORDINATOR_ADDRESS={address} is set but {missing} are not; set NUM_PROCESSES "
                             "(the process count) and PROCESS_ID (0 .. NUM_PROCESSES-1) for every process.")
    try:
      n, pid = int(env["NUM_PROCESSES"]), int(env["PROCESS_ID"])
    except ValueError:
      raise DistributedError(f"NUM_PROCESSES={env['NUM_PROCESSES']!r} and PROCESS_ID={env['PROCESS_ID']!r} "
                             "must be integers.") from None
    if not 0 <= pid < n:
      raise DistributedError(f"PROCESS_ID={pid} must lie in [0, NUM_PROCESSES={n}).")
    args = dict(coordinator_address=address, num_processes=n, process_id=pid)
    if env.get("LOCAL_DEVICE_IDS"):
      args["local_device_ids"] = [int(i) for i in env["LOCAL_DEVICE_IDS"].split(",")]
    return args
  if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return {}   # jax's SLURM cluster detection fills in the coordinator, count and id
  return None


def maybe_initialize(env: Mapping[str, str] | None = None) -> bool:
  """Initialize jax.distributed if the environment describes several processes; True if it did."""
  args = init_args(os.environ if env is None else env)
  if args is None:
    return False
  if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**args)
  return True
