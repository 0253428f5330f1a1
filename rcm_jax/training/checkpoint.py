"""Workdir guard and orbax checkpoints.

A workdir belongs to one config: its resolved config is written to `config.json` on first use, and a
later run whose config differs in anything but the resumable keys stops before any compute with the
first differing key named. Checkpoints are orbax `CheckpointManager` directories (keep-last-K,
periodic, atomic): a run resumes from the latest finished checkpoint automatically.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rcm_jax.errors import UserError

# Keys a resumed run may change: lengths, cadences and evaluation settings, never what defines the model,
# the data or the objective.
RESUMABLE_PREFIXES = ("train.num_steps", "train.log_every", "train.ckpt_every", "train.sample_every",
                      "train.keep", "train.profile", "train.progress", "eval.", "sample.", "generate.",
                      "stage_order", "mesh.", "sharding_rules.")   # checkpoints restore onto any mesh


# Keys added to the configs after workdirs were first written: a workdir whose config.json lacks one ran with
# this value, so it still resumes.
ADDED_KEY_DEFAULTS = {"optim.mu_dtype": "float32", "optim_critic.mu_dtype": "float32"}


class WorkdirError(UserError):
  pass


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def config_to_dict(config) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def guard_workdir(config, workdir: str) -> None:
  """Write config.json into a new workdir, or check that an existing one holds the same config."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  new = config_to_dict(config)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    a, b = _flatten(old), _flatten(new)
    a.update({k: v for k, v in ADDED_KEY_DEFAULTS.items() if k in b and k not in a})
    for key in sorted(set(a) | set(b)):
      if key.startswith(RESUMABLE_PREFIXES):
        continue
      if a.get(key, "<missing>") != b.get(key, "<missing>"):
        raise WorkdirError(
            f"Workdir {workdir} holds a run of another config: key '{key}' was {a.get(key, '<missing>')!r}, "
            f"now {b.get(key, '<missing>')!r}. Use a new --workdir (nothing here is overwritten), or pass "
            f"--config.{key}={a.get(key)!r} to resume that run.")
  if jax.process_index() == 0:
    with open(path + ".tmp", "w") as f:
      json.dump(new, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def manager(directory: str, *, keep: int, save_every: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=max(save_every, 1),
                                         create=True, enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, *, force: bool = False) -> bool:
  return mngr.save(step, args=ocp.args.StandardSave(serialization.to_state_dict(state)), force=force)


def restore(mngr: ocp.CheckpointManager, target: Any, step: int | None = None):
  """Restore into the structure of `target` (a state built by init); returns (state, step) or (target, None).

  Arrays come back with the shardings of `target`'s arrays, whatever mesh the checkpoint was saved under.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    return target, None
  abstract = jax.tree.map(_abstract, serialization.to_state_dict(target))
  restored = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  return serialization.from_state_dict(target, restored), step


def _abstract(x):
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return ocp.utils.to_shape_dtype_struct(x)


def load_params(stage_dir: str, *, use_ema: bool = True):
  """Params (EMA if present and asked for) of the latest checkpoint in a stage directory, as a dict tree."""
  ckpt_dir = os.path.join(stage_dir, "ckpt")
  mngr = ocp.CheckpointManager(os.path.abspath(ckpt_dir), item_handlers=ocp.StandardCheckpointHandler())
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {ckpt_dir}: run that stage first (or fix init_from).")
  # Read every array whole onto all devices, whatever mesh it was saved under; the caller places it.
  meta = mngr.item_metadata(step)
  whole = NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), P())
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=whole),
                          getattr(meta, "tree", meta))
  tree = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  mngr.close()
  params = tree["ema"] if use_ema and tree.get("ema") is not None else tree["params"]
  return params, step
