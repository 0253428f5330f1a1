"""The device mesh: its shape from `config.mesh`, and the checks a mesh must pass before anything compiles.

Axes, outermost first (the order matters on real hardware: inner axes get the fastest links):
  data     pure data parallelism: params replicated, batch split
  fsdp     data parallelism with params, EMA and optimizer state split too (ZeRO-3 / FSDP)
  context  sequence (context) parallelism for long videos: activations split along the tokens, Ulysses
           all-to-all (sequence <-> heads) around attention (rcm_jax.models.attention)
  tensor   tensor (model) parallelism over heads and the MLP hidden dim
`config.mesh` gives one size per axis; -1 (at most one axis) means "all devices left". Every check raises
`MeshError` naming the config key and the numbers, so a bad mesh fails before any compilation.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from rcm_jax.errors import UserError

AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")          # the mesh axes a global batch is split over
DEFAULT_MESH = dict(data=-1, fsdp=1, context=1, tensor=1)


class MeshError(UserError):
  pass


def resolve_shape(spec: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """{'data': -1, 'fsdp': 4, ...} and a device count -> every axis's size (in AXES order), checked."""
  unknown = sorted(set(spec) - set(AXES))
  if unknown:
    raise MeshError(f"config.mesh has unknown axes {unknown}; the axes are {list(AXES)}.")
  sizes = {a: int(spec.get(a, DEFAULT_MESH[a])) for a in AXES}
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise MeshError(f"config.mesh.{a}={s}: an axis size is a positive integer, or -1 for the devices left.")
  auto = [a for a, s in sizes.items() if s == -1]
  if len(auto) > 1:
    raise MeshError(f"config.mesh: only one axis may be -1, got {auto}.")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  desc = " x ".join(f"{a}={s}" for a, s in sizes.items())
  if auto:
    if num_devices % fixed:
      raise MeshError(f"config.mesh ({desc}): the fixed axes take {fixed} devices, which does not divide the "
                      f"{num_devices} devices; change the sizes so that their product divides {num_devices}.")
    sizes[auto[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise MeshError(f"config.mesh ({desc}) has {fixed} devices but there are {num_devices}; make the product "
                    f"of the axis sizes {num_devices}, or set one axis to -1.")
  return sizes


def make_mesh(spec: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
  """A `Mesh` over `devices` (default: all, over every process) with the axes AXES, shaped by `spec`."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_shape(dict(spec or DEFAULT_MESH), len(devices))
  shape = tuple(sizes[a] for a in AXES)
  try:   # a topology-aware layout where the platform has one (TPU, GPU)
    from jax.experimental import mesh_utils
    array = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except Exception:   # noqa: BLE001 -- any layout failure: fall back to the plain device order
    array = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(array, AXES)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
  return {a: int(mesh.shape[a]) for a in mesh.axis_names}


def check_batch(batch_size: int, sizes: Mapping[str, int], *, grad_accum: int = 1) -> None:
  """The global batch (and each grad-accumulation micro-batch) must split evenly over data x fsdp."""
  ways = math.prod(int(sizes.get(a, 1)) for a in BATCH_AXES)
  desc = " x ".join(f"{a}={int(sizes.get(a, 1))}" for a in BATCH_AXES)
  if batch_size % ways:
    raise MeshError(f"train.batch_size={batch_size} is not divisible by the batch axes of config.mesh "
                    f"({desc} = {ways}); use a multiple of {ways}, or change config.mesh.")
  micro = batch_size // max(grad_accum, 1)
  if grad_accum > 1 and micro % ways:
    raise MeshError(f"train.batch_size={batch_size} / train.grad_accum={grad_accum} = {micro} examples per "
                    f"micro-batch, not divisible by the batch axes of config.mesh ({desc} = {ways}).")


def check_context(sizes: Mapping[str, int], *, num_tokens: int, num_heads: int) -> None:
  """A context axis splits the token sequence and (Ulysses all-to-all) the heads: it must divide both."""
  c = int(sizes.get("context", 1))
  if num_tokens % c:
    raise MeshError(f"config.mesh.context={c} does not divide the sequence of {num_tokens} tokens; pick a "
                    f"context size that divides {num_tokens}.")
  if num_heads % c:
    raise MeshError(f"config.mesh.context={c} does not divide model.num_heads={num_heads}; pick a context size "
                    f"that divides {num_heads}.")


def check_config(config, *, num_devices: int | None = None, num_tokens: int | None = None) -> dict[str, int]:
  """Every mesh check a training config needs; returns the resolved axis sizes."""
  n = jax.device_count() if num_devices is None else num_devices
  sizes = resolve_shape(dict(config.get("mesh", DEFAULT_MESH)), n)
  check_batch(config.train.batch_size, sizes, grad_accum=config.train.grad_accum)
  if num_tokens is not None:
    check_context(sizes, num_tokens=num_tokens, num_heads=config.model.num_heads)
  return sizes
