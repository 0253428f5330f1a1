"""How the trainer's pieces land on the mesh: the plan (mesh + rules) and the three calls the trainer makes.

  plan = parallel.plan_from_config(config)           # mesh from config.mesh, rules from config.sharding_rules
  state = parallel.place(plan, state)                 # device_put to the rules' NamedShardings
  state = parallel.build(plan, make_state, params)    # or computed straight onto them
  update = parallel.jit_update(plan, fn, state)       # jit with the batch constrained, state out_shardings
  batch = parallel.global_batch(plan, local_batch)    # this process's rows -> one global array per leaf
With one device every call is a no-op in effect, so the single-device path computes what it always did.

`jit_update` traces and runs the step under `activate(plan)`: the mesh as JAX's ambient mesh and the plan's
rules as the activation rules, so the model's attention sees the `context` axis (Ulysses context parallelism,
`rcm_jax.models.attention`) and its residual stream is pinned to ("batch", "tokens") shardings. Any other
jitted model call (a rollout on a sequence-sharded KV cache, a benchmark) does the same with
`with parallel.activate(plan): ...`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, Mapping

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rcm_jax.parallel import mesh as mesh_lib
from rcm_jax.parallel import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class Plan:
  mesh: Mesh
  rules: Mapping[str, tuple[str, ...]]


def plan_from_config(config, devices=None) -> Plan:
  """The mesh of `config.mesh` (default: every device on `data`) over `devices` (default: all)."""
  mesh = mesh_lib.make_mesh(dict(config.get("mesh", mesh_lib.DEFAULT_MESH)), devices)
  rules = sharding_lib.rules_from_config(config)
  if mesh.shape["context"] > 1 and "context" not in rules.get("tokens", ()):
    logging.warning("config.mesh.context=%d but config.sharding_rules.tokens=%r does not name 'context': "
                    "activations outside attention stay whole over that axis.", mesh.shape["context"],
                    ",".join(rules.get("tokens", ())))
  return Plan(mesh, rules)


@contextlib.contextmanager
def activate(plan: Plan):
  """Trace and run under the plan: JAX's ambient mesh (attention's context axis) and the activation rules."""
  with jax.set_mesh(plan.mesh), sharding_lib.use_rules(plan.rules):
    yield


def shardings(plan: Plan, tree):
  """NamedShardings of a params-like tree (TrainState, frozen teachers) under the plan's rules."""
  return sharding_lib.tree_shardings(tree, plan.mesh, plan.rules)


def place(plan: Plan, tree):
  return jax.device_put(tree, shardings(plan, tree))


def build(plan: Plan, fn: Callable, *args):
  """fn(*args) (a params-like tree: a TrainState, weights) computed by one jit whose outputs land straight on
  the rules' shardings, so no whole copy of it is made on one device and then placed (which also leaves holes
  in the accelerator's allocator). Pass large inputs as args: arrays fn closes over become constants of the
  compiled program. Inputs committed to devices outside the mesh's (e.g. weights loaded onto one device) are
  replicated onto the mesh first, as `jit` cannot mix the two."""
  mesh_devices = set(plan.mesh.devices.flat)
  onto_mesh = lambda x: (jax.device_put(x, NamedSharding(plan.mesh, P())) if isinstance(x, jax.Array)
                         and x.committed and x.sharding.device_set != mesh_devices else x)
  args = jax.tree.map(onto_mesh, args)
  return jax.jit(fn, out_shardings=shardings(plan, jax.eval_shape(fn, *args)))(*args)


def global_batch(plan: Plan, local_batch):
  """This process's slice of the global batch (numpy, batch-major) -> global arrays split over (data, fsdp)."""
  def put(x):
    x = np.asarray(x)
    sh = NamedSharding(plan.mesh, sharding_lib.batch_spec(plan.rules, plan.mesh, x.ndim))
    return jax.make_array_from_process_local_data(sh, x)
  return jax.tree.map(put, local_batch)


def jit_update(plan: Plan, update: Callable, state, *, donate: bool = True):
  """jit an update(state, frozen, batch, rng) -> (state, metrics) so the state keeps its shardings,
  the batch is pinned to its split, and the metrics come back replicated."""
  def fn(state, frozen, batch, rng):
    return update(state, frozen, sharding_lib.constrain_batch(batch, plan.mesh, plan.rules), rng)
  jitted = jax.jit(fn, donate_argnums=(0,) if donate else (),
                   out_shardings=(shardings(plan, state), NamedSharding(plan.mesh, P())))
  return _Activated(plan, jitted)


class _Activated:
  """A jitted function called (and lowered) under `activate(plan)`; `.jitted` is the bare jit."""

  def __init__(self, plan: Plan, jitted):
    self.plan, self.jitted = plan, jitted
    functools.update_wrapper(self, jitted)

  def __call__(self, *args, **kwargs):
    with activate(self.plan):
      return self.jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with activate(self.plan):
      return self.jitted.lower(*args, **kwargs)


def jit_activated(plan: Plan, fn: Callable, **jit_kwargs):
  """jax.jit(fn, **jit_kwargs), traced and run under `activate(plan)`."""
  return _Activated(plan, jax.jit(fn, **jit_kwargs))


def kv_cache_shardings(plan: Plan, cache):
  """NamedShardings of a rollout KV cache {"k", "v": [layers, B, S, H, Dh]}: S over `context` (rule `tokens`)."""
  return sharding_lib.kv_cache_shardings(cache, plan.mesh, plan.rules)
