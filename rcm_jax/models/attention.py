"""The one attention entry point of rcm-jax: every layer calls `attention`, and `impl` picks the backend.

- "xla": `pallas_kernels.reference.attention` (materialises [Lq, Lk]; any mask; CPU and short sequences).
- "pallas": `pallas_kernels.flash_attention` (masked flash kernel with custom grad/JVP rules; GPU).
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, unmasked only (bidirectional teacher on GPU).

Context parallelism (Ulysses): when the ambient mesh (`jax.set_mesh`, which `rcm_jax.parallel.jit_update` sets
around the trainer's step) has a `context` axis of size c > 1, the token sequence of q/k/v is split over it.
`attention` then runs inside `shard_map`: an all-to-all turns [B, L/c, H, D] into [B, L, H/c, D] (sequence ->
heads), the backend kernel runs on the whole sequence for its H/c heads, so a static [Lq, Lk] mask (teacher
forcing, block-causal, chunk-vs-cache) applies unchanged, and a second all-to-all turns the output back. The
exchange is made of linear collectives, so `jax.jvp` tangents (the sCM path, through the kernel's JVP rule)
and gradients go through the same all-to-alls. Keys/values whose length the context axis does not divide, or
an unmasked cross-attention against a short context, stay whole on every device (each device takes its own
heads, or, unmasked, keeps its query slice and needs no exchange at all).

Data / FSDP / tensor parallelism without a context axis: XLA cannot split the Pallas kernel (a custom call, which
GSPMD runs whole on every device after gathering its operands: measured on 2 H100s, an FSDP TF-sCM step did both
videos' attention on each card). So with impl "pallas" under a mesh of more than one device the kernel runs
inside the same `shard_map` with no exchange: batch over the `batch` rule's axes, heads over the `heads` rule's.
"""
from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

from pallas_kernels import reference
from pallas_kernels.mask import KeyIntervals, Mask

IMPLS = ("xla", "pallas", "cudnn")
CONTEXT = "context"


def _local_attention(q, k, v, mask, impl):
  if impl == "xla":
    return reference.attention(q, k, v, mask)
  if impl == "pallas":
    from pallas_kernels import flash_attention  # lazy: the kernel lives in its own package and may be absent
    return flash_attention(q, k, v, mask)
  if impl == "cudnn":
    if mask is not None:
      raise ValueError("attention impl 'cudnn' supports no mask; use impl='pallas' (or 'xla') for masked "
                       "attention.")
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  raise ValueError(f"unknown attention impl {impl!r}; use one of {IMPLS}.")


def context_mesh():
  """The ambient (abstract) mesh if it has a context axis > 1 that is not already manual, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or CONTEXT not in mesh.axis_names or mesh.shape[CONTEXT] == 1:
    return None
  if CONTEXT in mesh.manual_axes:   # already inside a shard_map over the context axis
    return None
  return mesh


def attention(q, k, v, mask: Mask | None = None, *, impl: str = "xla"):
  """q: [B, Lq, H, D], k/v: [B, Lk, Hkv, D] (Hkv | H) -> [B, Lq, H, D] in q.dtype; softmax scale D**-0.5.

  mask: a static `pallas_kernels.Mask` of shape [Lq, Lk] (True = may attend), or None for full attention (or,
  without a mesh, a run-time `KeyIntervals`: the same keys for every query row). Under a mesh with context > 1:
  Ulysses context parallelism (module docstring).
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; use one of {IMPLS}.")
  mesh = context_mesh()
  if mesh is None and impl == "pallas":
    mesh = kernel_mesh()
  if mesh is None:
    return _local_attention(q, k, v, mask, impl)
  if isinstance(mask, KeyIntervals):
    raise ValueError("a run-time KeyIntervals mask (rollout.stream(runtime_masks=True)) runs on one device; "
                     "stream without a mesh, or with runtime_masks=False.")
  return ulysses_attention(q, k, v, mask, impl=impl, mesh=mesh)


def stacked_attention(q, k, v, index, mask: Mask | None = None, *, impl: str = "xla"):
  """Forward-only `attention` against entry `index` (int32, may be traced) of stacked k/v [N, B, Lk, Hkv, D]: a
  streaming KV cache of every layer, read by layer index. With impl "pallas" and no mesh the kernel reads the
  stack in place (`pallas_kernels.flash_attention_stacked`); otherwise entry `index` is sliced out first."""
  if impl not in IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; use one of {IMPLS}.")
  if impl == "pallas" and context_mesh() is None and kernel_mesh() is None:
    from pallas_kernels import flash_attention_stacked  # lazy, as in `_local_attention`
    return flash_attention_stacked(q, k, v, index, mask)
  take = lambda x: jax.lax.dynamic_index_in_dim(x, index, 0, keepdims=False)
  return attention(q, take(k), take(v), mask, impl=impl)


def kernel_mesh():
  """The ambient (abstract) mesh if any of its axes not already manual has size > 1, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or all(mesh.shape[a] == 1 or a in mesh.manual_axes for a in mesh.axis_names):
    return None
  return mesh


def _axes_that_divide(axes, mesh, size: int):
  """The mesh axes (of size > 1, in order) of a rule, kept only if their product divides `size`."""
  axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1 and a not in mesh.manual_axes)
  if not axes or size % math.prod(mesh.shape[a] for a in axes):
    return None
  return axes if len(axes) > 1 else axes[0]


def ulysses_attention(q, k, v, mask: Mask | None = None, *, impl: str, mesh):
  """Attention with the sequence split over mesh axis `context` (size c): all-to-all sequence <-> heads.

  Needs c | Lq and c | H (and c | Hkv): otherwise a `MeshError` naming the numbers, at trace time (before any
  compilation). The batch is split over the `batch` rule's axes and heads over the `heads` rule's axes where
  those divide the sizes (`rcm_jax.parallel.sharding.current_rules`). With c = 1 (or no context axis) there is
  no exchange: the kernel runs on each device's batch / head shard.
  """
  from rcm_jax.parallel import mesh as mesh_lib          # lazy: parallel imports nothing from models
  from rcm_jax.parallel import sharding as sharding_lib
  c = int(mesh.shape[CONTEXT]) if CONTEXT in mesh.axis_names and CONTEXT not in mesh.manual_axes else 1
  b, lq, h, _ = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  mesh_lib.check_context({CONTEXT: c}, num_tokens=lq, num_heads=h)
  if hkv % c:
    mesh_lib.check_context({CONTEXT: c}, num_tokens=lq, num_heads=hkv)
  rules = sharding_lib.current_rules()
  batch_ax = _axes_that_divide(rules.get("batch", ()), mesh, b)
  head_ax = _axes_that_divide(tuple(a for a in rules.get("heads", ()) if a != CONTEXT), mesh, h)
  if head_ax is not None:   # heads split over tensor first, then over context inside the shard_map
    t = math.prod(mesh.shape[a] for a in ((head_ax,) if isinstance(head_ax, str) else head_ax))
    if h % (t * c) or hkv % (t * c):
      head_ax = None
  # k/v split along the sequence (and exchanged) when c divides Lk and they are this sequence's keys (a mask,
  # or Lk == Lq); an unmasked cross-attention to a short context keeps k/v whole.
  kv_split = lk % c == 0 and (mask is not None or lk == lq)
  seq_ax = CONTEXT if c > 1 else None
  q_spec = P(batch_ax, seq_ax, head_ax, None)
  kv_spec = P(batch_ax, seq_ax if kv_split else None, head_ax, None)

  def a2a_seq_to_heads(x):   # [b, L/c, h, D] -> [b, L, h/c, D]
    return jax.lax.all_to_all(x, CONTEXT, split_axis=2, concat_axis=1, tiled=True)

  def own_heads(x):          # whole sequence on every device: take this device's h/c heads
    n = x.shape[2] // c
    return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(CONTEXT) * n, n, axis=2)

  def body(q, k, v):
    if c == 1 or (not kv_split and mask is None):   # no exchange: c = 1, or unmasked whole k/v
      return _local_attention(q, k, v, mask, impl)
    q = a2a_seq_to_heads(q)
    if kv_split:
      k, v = a2a_seq_to_heads(k), a2a_seq_to_heads(v)
    else:
      k, v = own_heads(k), own_heads(v)
    o = _local_attention(q, k, v, mask, impl)                        # [b, Lq, h/c, D]
    return jax.lax.all_to_all(o, CONTEXT, split_axis=1, concat_axis=2, tiled=True)   # [b, Lq/c, h, D]

  fn = jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                     check_vma=impl == "xla")
  return fn(q, k, v)
