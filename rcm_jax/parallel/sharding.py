"""Logical-axis sharding rules: which mesh axes each logical array axis is split over.

Arrays are described by logical axis names (`batch`, `embed`, `mlp`, `heads`, `kv`, `frames`, `tokens`,
`layers`, `vocab`); a rules table (`config.sharding_rules`) maps each name to mesh axes. Models never name a
device or a mesh axis: params get their logical names here, from their path and shape
(`param_logical_axes`), so one function serves the student, its EMA, the optimizer state (whose leaves
carry the param paths), a critic under `TrainState.extra` and frozen teachers.

A dimension is split only when its size is divisible by the mesh axes it maps to, and a mesh axis is used
at most once per array; otherwise that dimension is replicated. So any params tree gets a valid spec on any
mesh, and small tensors (biases of odd sizes, scalars) simply stay whole.

Activations: inside a step traced under a mesh (`jax.set_mesh`) and a rules table (`use_rules`, both set by
`rcm_jax.parallel.plan.activate`), `constrain(x, names)` pins an activation to its logical axes (the DiT's
residual stream is ("batch", "tokens", None): sequence-sharded over `context`). Outside a mesh it is the
identity. The KV cache `{"k", "v": [layers, B, S, H, Dh]}` gets ("layers", "batch", "tokens", "heads", "kv")
(`kv_cache_shardings`): split along the sequence over `context`.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rcm_jax.errors import UserError
from rcm_jax.parallel.mesh import AXES

# logical name -> mesh axes, as in config.sharding_rules ("" = replicated, "a,b" = split over a x b).
DEFAULT_RULES = dict(
    batch="data,fsdp",   # examples of a batch
    embed="fsdp",        # the model width D: params are split over fsdp along it (FSDP / ZeRO-3)
    mlp="tensor",        # the feed-forward hidden dim
    heads="tensor",      # attention heads (q/k/v output features, attention output input features)
    kv="",               # per-head features
    frames="",           # latent frames of a video
    tokens="context",    # the token sequence (context parallelism)
    layers="",           # the stacked-layer axis of scanned blocks
    vocab="",            # rows of embedding tables (class labels)
)

# Named kernels -> the logical axes of their last two dims ([in, out]); any other kernel is "generic".
_KERNEL_AXES = {
    "to_q": ("embed", "heads"), "to_k": ("embed", "heads"), "to_v": ("embed", "heads"),
    "to_out_0": ("heads", "embed"),
    "proj": ("embed", "mlp"),          # ffn/net_0/proj
    "net_2": ("mlp", "embed"),
}
# Named 1-D params that live on a tensor-split dim (their module's output features).
_VECTOR_AXES = {"to_q": "heads", "to_k": "heads", "to_v": "heads", "proj": "mlp",
                "norm_q": "heads", "norm_k": "heads"}


class ShardingError(UserError):
  pass


def parse_rules(rules: Mapping[str, Any] | None) -> dict[str, tuple[str, ...]]:
  """{'embed': 'fsdp', 'batch': 'data,fsdp', 'kv': ''} (config strings, tuples or None) -> name -> axes."""
  merged = dict(DEFAULT_RULES, **dict(rules or {}))
  out = {}
  for name, axes in merged.items():
    if axes is None:
      axes = ()
    elif isinstance(axes, str):
      axes = tuple(a.strip() for a in axes.split(",") if a.strip())
    else:
      axes = tuple(axes)
    bad = [a for a in axes if a not in AXES]
    if bad or len(set(axes)) != len(axes):
      raise ShardingError(f"config.sharding_rules.{name}={merged[name]!r}: mesh axes must be distinct names "
                          f"from {list(AXES)} joined by ',' ('' for replicated); got {list(axes)}.")
    out[name] = axes
  return out


def rules_from_config(config) -> dict[str, tuple[str, ...]]:
  return parse_rules(dict(config.get("sharding_rules", {}) or {}))


def logical_spec(names: Sequence[str | None], rules: Mapping[str, tuple[str, ...]], mesh: Mesh,
                 shape: Sequence[int] | None = None) -> P:
  """Logical axis names of an array (one per dim, None = replicated) -> its PartitionSpec on `mesh`.

  With `shape`, a dim whose size the mapped axes do not divide is replicated instead; a mesh axis already
  used by an earlier dim is dropped; axes of size 1 are left out of the spec.
  """
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    axes = tuple(a for a in (rules.get(name, ()) if name else ())
                 if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
    ways = math.prod(mesh.shape[a] for a in axes)
    if not axes or (shape is not None and shape[i] % ways):
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def _path_names(path) -> list[str]:
  names = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      names.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      names.append(k.name)
  return names


def param_logical_axes(names: Sequence[str], shape: Sequence[int]) -> tuple[str | None, ...]:
  """Logical axes of one param (or optimizer / EMA leaf) from its path names and shape.

  Scanned blocks (a `blocks` subtree, not `blocks_{i}`) carry a leading `layers` dim. Known kernels and
  vectors get their named axes (tensor parallelism); any other kernel or embedding table is split along
  its largest dim as `embed` (FSDP); everything else (biases, norms, modulation tables, scalars) is whole.
  """
  lead: tuple[str | None, ...] = ()
  if "blocks" in names and len(shape) >= 1:
    lead, shape = ("layers",), tuple(shape[1:])
  rank = len(shape)
  leaf = names[-1] if names else ""
  module = names[-2] if len(names) >= 2 else ""
  if rank == 2 and leaf == "kernel" and module in _KERNEL_AXES:
    return lead + _KERNEL_AXES[module]
  if rank == 1 and module in _VECTOR_AXES:
    return lead + (_VECTOR_AXES[module],)
  # Other weight matrices (kernels, embedding tables); small modulation tables stay whole: splitting their
  # width forces GSPMD to re-gather them at every per-frame broadcast.
  if rank >= 2 and leaf in ("kernel", "embedding"):
    big = max(range(rank), key=lambda i: (shape[i], -i))   # the largest dim; the first one on ties
    return lead + tuple("embed" if i == big else None for i in range(rank))
  return lead + (None,) * rank


def tree_specs(tree, mesh: Mesh, rules: Mapping[str, tuple[str, ...]]):
  """PartitionSpecs for every array leaf of any pytree of params-like arrays (params, EMA, opt state, ...)."""
  def spec(path, x):
    shape = tuple(getattr(x, "shape", ()))
    return logical_spec(param_logical_axes(_path_names(path), shape), rules, mesh, shape)
  return jax.tree_util.tree_map_with_path(spec, tree)


def tree_shardings(tree, mesh: Mesh, rules: Mapping[str, tuple[str, ...]]):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), tree_specs(tree, mesh, rules),
                      is_leaf=lambda s: isinstance(s, P))


def batch_spec(rules: Mapping[str, tuple[str, ...]], mesh: Mesh, ndim: int) -> P:
  """Batch-major arrays: the leading dim over the `batch` rule's mesh axes, the rest whole."""
  if ndim == 0:
    return P()
  return logical_spec(("batch",) + (None,) * (ndim - 1), rules, mesh)


def batch_shardings(batch, mesh: Mesh, rules: Mapping[str, tuple[str, ...]]):
  return jax.tree.map(lambda x: NamedSharding(mesh, batch_spec(rules, mesh, x.ndim)), batch)


def constrain_batch(batch, mesh: Mesh, rules: Mapping[str, tuple[str, ...]]):
  """Inside jit: pin the batch input to its (data, fsdp) split so GSPMD propagates from it."""
  return jax.lax.with_sharding_constraint(batch, batch_shardings(batch, mesh, rules))


# ------------------------------------------------------------------------------------------ activations
_RULES: contextvars.ContextVar = contextvars.ContextVar("rcm_jax_sharding_rules", default=None)


def current_rules() -> dict[str, tuple[str, ...]]:
  """The rules table of the step being traced (`use_rules`), else the defaults."""
  rules = _RULES.get()
  return parse_rules(None) if rules is None else rules


@contextlib.contextmanager
def use_rules(rules: Mapping[str, tuple[str, ...]]):
  token = _RULES.set(dict(rules))
  try:
    yield
  finally:
    _RULES.reset(token)


def constrain(x, names: Sequence[str | None]):
  """Pin activation `x` to its logical axes under the ambient mesh (no-op without one, or on one device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or mesh.manual_axes:
    return x
  spec = logical_spec(names, current_rules(), mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, spec)


KV_CACHE_AXES = ("layers", "batch", "tokens", "heads", "kv")   # {"k", "v": [layers, B, S, H, Dh]}


def kv_cache_specs(cache, mesh: Mesh, rules: Mapping[str, tuple[str, ...]]):
  """PartitionSpecs of a rollout KV cache {"k", "v": [layers, B, S, H, Dh]}: S over the `tokens` rule (context)."""
  def spec(x):
    if x.ndim != len(KV_CACHE_AXES):
      raise ShardingError(f"a KV cache leaf has shape {tuple(x.shape)}; expected [layers, B, S, H, Dh].")
    return logical_spec(KV_CACHE_AXES, rules, mesh, x.shape)
  return jax.tree.map(spec, cache)


def kv_cache_shardings(cache, mesh: Mesh, rules: Mapping[str, tuple[str, ...]]):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), kv_cache_specs(cache, mesh, rules),
                      is_leaf=lambda s: isinstance(s, P))
