"""`flash_attention`: the public op. Validation, padding, and the autodiff wiring of the kernels.

Wiring choice: one hijax primitive (`jax.experimental.hijax.HiPrim`) carries both derivative rules.
  - `vjp_fwd` / `vjp_bwd_retval`: forward kernel saving (o, lse2), then the dq and dk/dv kernels;
  - `jvp`: the fused forward+JVP kernel (symbolic-zero tangents are dropped at trace time);
  - `expand`: the forward kernel alone (plain evaluation).
So `jax.grad`, `jax.jvp`, `jax.jit` and the sCM pattern (grad of a loss whose target holds a jvp of the
same function at stop-gradient'ed params and inputs) all go through the same call, with no flag in the
model. We chose it over the two-op fallback (custom_vjp for training + custom_jvp for the JVP branch,
picked by a static flag) because it works on both jax versions we run: 0.12.0.1 (CPU interpret tests:
jit, grad, jvp, vmap, the sCM pattern, `jax.checkpoint`) and 0.11.2 on the H100 (compiled Triton: fwd,
grad, jvp, and the sCM gradient under `jax.checkpoint`), while the fallback would push a mode flag into
every model call.
`jax.vmap` folds the mapped axis into the batch axis (`batch` rule), so per-sample losses work too.
What is NOT supported: reverse mode *through* the JVP (grad of a jvp at non-stop-gradient'ed inputs,
i.e. second order); the jvp rule's kernel has no transpose. The sCM/MeanFlow losses never need it.
Remat: under `jax.checkpoint` the op is recomputed whole (HiPrim's default), unless the policy saves the
names in RESIDUAL_NAMES ("flash_out", "flash_lse"; e.g. `save_only_these_names(*RESIDUAL_NAMES)`): then
the `remat` rule runs the forward kernel once, keeps o and lse, and the recomputation replays them
(`_FlashReplay`), so the backward pass runs only the dq and dk/dv kernels. Either way remat needs
`jax.config.update("jax_remat3", True)` (jax 0.11.2 / 0.12): the legacy remat path fails with
"Linearization failed ..." on any hijax primitive. We do not flip that global flag on import; the
training entry point sets it.

`implementation="xla"` selects `pallas_kernels.reference.attention` instead (materialises scores; short
sequences only, or hardware without Pallas-Triton).

Backend (`backend=` argument, else the `RCM_FLASH_BACKEND` environment variable, default "auto"):
"auto" runs the forward (plain evaluation and the VJP's forward), the backward (dq, dk/dv) and the fused
forward+JVP through the Mosaic GPU kernels (`pallas_kernels/mosaic.py`) on compute capability 9.x GPUs for
bf16 inputs whose mask they handle, and through the Triton kernels otherwise; "triton" forces Triton;
"mosaic" forces Mosaic (a `UserError` where it cannot run); "mosaic_fwd" is the Mosaic forward with the
Triton backward and JVP (the earlier pairing, kept for comparison). Every forward kernel writes the same
lse2, so any backward can follow any forward.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import hijax

from pallas_kernels import kernels, mosaic, reference
from pallas_kernels.kernels import BlockSizes, KernelConfig
from pallas_kernels.mask import KeyIntervals, Mask, runtime_schedule, tile_schedule
from rcm_jax.errors import UserError

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float32)  # the two checked on the H100 (float16 never was)
IMPLEMENTATIONS = ("pallas", "xla")
BACKENDS = ("auto", "triton", "mosaic", "mosaic_fwd")
BACKEND_ENV = "RCM_FLASH_BACKEND"
# Names a `jax.checkpoint` policy saves to keep the forward kernel's output and logsumexp (`_FlashAttention.remat`).
RESIDUAL_NAMES = ("flash_out", "flash_lse")


def _round_up(x, m):
  return -(-x // m) * m


def _head_dim_pad(d: int) -> int:
  """The kernels' head dim for D: the smallest of SUPPORTED_HEAD_DIMS >= D (zero columns pad q, k, v)."""
  return min(x for x in SUPPORTED_HEAD_DIMS if x >= d)


def _shrink(cfg: KernelConfig, lq: int, lk: int) -> KernelConfig:
  """Smaller tiles for short sequences (keeps interpret-mode tests and decode cases cheap)."""
  p2 = lambda n: max(16, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
  return KernelConfig(min(cfg.block_q, p2(lq)), min(cfg.block_k, p2(lk)), cfg.num_warps, cfg.num_stages)


class _Plan:
  """Everything static about one call: tiles, padded lengths and schedules (hashable by its key)."""

  def __init__(self, mask: Mask, lq: int, lk: int, sm_scale: float, blocks: BlockSizes, interpret: bool,
               backend: str = "triton"):
    self.fwd, self.dq, self.dkdv, self.jvp = (_shrink(c, lq, lk) for c in blocks.all())
    cfgs = (self.fwd, self.dq, self.dkdv, self.jvp)
    self.lq_pad = _round_up(lq, max(c.block_q for c in cfgs))
    self.lk_pad = _round_up(lk, max(c.block_k for c in cfgs))
    self.mask, self.sm_scale, self.interpret = mask, sm_scale, interpret
    # the kernels a call runs, resolved by `resolve_backend`: "triton", "mosaic" or "mosaic_fwd"
    self.fwd_backend = "triton" if backend == "triton" else "mosaic"
    self.bwd_backend = self.jvp_backend = "mosaic" if backend == "mosaic" else "triton"
    self.key = (mask, lq, lk, sm_scale, blocks, interpret, backend)

  def padded(self, q, k, v):
    """q, k, v padded to the tile multiples lq_pad / lk_pad."""
    return _pad(q, self.lq_pad), _pad(k, self.lk_pad), _pad(v, self.lk_pad)

  def sched(self, cfg: KernelConfig):
    return tile_schedule(self.mask, self.lq_pad, self.lk_pad, cfg.block_q, cfg.block_k)

  def __hash__(self):
    return hash(self.key)

  def __eq__(self, other):
    return isinstance(other, _Plan) and self.key == other.key


def _pad(x, length):
  return x if x.shape[1] == length else jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def _backward(plan: _Plan, res, do):
  """(q, k, v, o, lse) and the output cotangent -> dq, dk, dv (the dq and dk/dv kernels)."""
  q, k, v, o, lse = res
  p = plan
  do = hijax.instantiate_zeros(do) if isinstance(do, hijax.Zero) else do
  if p.bwd_backend == "mosaic":
    return mosaic.backward(q, k, v, o, lse, do, p.mask, sm_scale=p.sm_scale)
  qp, kp, vp = p.padded(q, k, v)
  dq, dk, dv = kernels.backward(
      qp, kp, vp, _pad(o, p.lq_pad), lse, _pad(do.astype(q.dtype), p.lq_pad),
      p.sched(p.dq), p.sched(p.dkdv), p.dq, p.dkdv, sm_scale=p.sm_scale, interpret=p.interpret)
  lq, lk = q.shape[1], k.shape[1]
  return dq[:, :lq], dk[:, :lk], dv[:, :lk]


# jax 0.12's HiPrim remat rule returns (out, residuals, rem(residuals, *args)); jax 0.11.2's (out, rem(*args)),
# whose closure holds the residuals.
_REMAT_RULE_RETURNS_RESIDUALS = tuple(jax.__version_info__[:2]) >= (0, 12)


def _policy_saves(policy, aval, names) -> bool:
  """Whether a `jax.checkpoint` policy keeps values tagged with every one of `names` on the device (asked the
  way `checkpoint_name` asks it; an offloading answer counts as no: the replay keeps them on the device)."""
  if policy is None:                  # jax.checkpoint without a policy: save nothing
    return False
  from jax._src.ad_checkpoint import name_p                   # the primitive the policies are asked about
  from jax._src.interpreters import partial_eval as pe
  return all(isinstance(pe.ensure_enum(policy(name_p, aval, name=n)), pe.SaveableType) for n in names)


class _FlashAttention(hijax.HiPrim):
  """(q [B, Lq, H, D], k [B, Lk, Hkv, D], v [B, Lk, Hkv, D]) -> o [B, Lq, H, D]."""

  def __init__(self, q_aval, k_aval, v_aval, plan: _Plan):
    self.in_avals = (q_aval, k_aval, v_aval)
    self.out_aval = hijax.ShapedArray(q_aval.shape, q_aval.dtype)
    self.params = dict(plan=plan)
    super().__init__()

  def _forward(self, q, k, v, differentiated=True):
    p = self.plan
    if p.fwd_backend == "mosaic":   # unpadded: mosaic pads only for its interpreter (`mosaic._pad_len`)
      return mosaic.forward(q, k, v, p.mask, sm_scale=p.sm_scale, unpadded_o=not differentiated)
    qp, kp, vp = p.padded(q, k, v)
    o, lse = kernels.forward(qp, kp, vp, p.sched(p.fwd), p.fwd, sm_scale=p.sm_scale, interpret=p.interpret)
    return o[:, :q.shape[1]], lse

  def expand(self, q, k, v):
    return self._forward(q, k, v, differentiated=False)[0]

  def vjp_fwd(self, nzs_in, q, k, v):
    del nzs_in
    o, lse = self._forward(q, k, v)
    return o, (q, k, v, o, lse)

  def vjp_bwd_retval(self, res, do):
    return _backward(self.plan, res, do)

  def remat(self, trace, q, k, v):
    """Under `jax.checkpoint`: recompute the op whole (HiPrim's default), unless the remat policy saves
    both RESIDUAL_NAMES; then the forward kernel runs once and the recomputation replays its output and
    logsumexp (`_FlashReplay`), so the backward pass never re-runs the forward kernel."""
    if not _policy_saves(trace.policy, self.out_aval, RESIDUAL_NAMES):
      return super().remat(trace, q, k, v)
    o, lse = self._forward(q, k, v)
    replay = _FlashReplay(self.in_avals, jax.typeof(lse), self.plan)
    if _REMAT_RULE_RETURNS_RESIDUALS:
      return o, (o, lse), lambda res, q, k, v: replay(q, k, v, *res)
    return o, lambda q, k, v: replay(q, k, v, o, lse)

  def batch(self, axis_data, args, dims):
    """vmap: fold the mapped axis into the batch axis (one kernel launch, same schedules)."""
    q, k, v = hijax.bdims_at_front(axis_data, args, dims)  # [N, B, L, H, D]
    n = axis_data.size
    q2, k2, v2 = (x.reshape(n * x.shape[1], *x.shape[2:]) for x in (q, k, v))
    out = _FlashAttention(jax.typeof(q2), jax.typeof(k2), jax.typeof(v2), self.plan)(q2, k2, v2)
    return out.reshape(q.shape), 0

  def jvp(self, primals, tangents):
    q, k, v = primals
    p = self.plan
    qp, kp, vp = p.padded(q, k, v)
    tq, tk, tv = (None if isinstance(t, hijax.Zero) else t for t in tangents)
    if tq is None and tk is None and tv is None:
      o = self.expand(q, k, v)
      return o, jnp.zeros_like(o)
    if p.jvp_backend == "mosaic":
      return mosaic.forward_jvp(q, k, v, tq, tk, tv, p.mask, sm_scale=p.sm_scale)
    tq = None if tq is None else _pad(tq, p.lq_pad)
    tk = None if tk is None else _pad(tk, p.lk_pad)
    tv = None if tv is None else _pad(tv, p.lk_pad)
    o, to = kernels.forward_jvp(qp, kp, vp, tq, tk, tv, p.sched(p.jvp), p.jvp, sm_scale=p.sm_scale,
                                interpret=p.interpret)
    lq = q.shape[1]
    return o[:, :lq], to[:, :lq]


class _FlashReplay(hijax.HiPrim):
  """(q, k, v, o, lse) -> o: the op replayed from its saved forward (`_FlashAttention.remat`). Its value is
  the saved o; its VJP runs the backward kernels with the saved o and lse; o and lse get no cotangent (the
  recomputed q, k, v carry the whole derivative). No vmap rule: `vmap` of a rematted grad batches the op
  before the remat rule replaces it (tests/test_flash_attention.py checks per-example gradients)."""

  def __init__(self, qkv_avals, lse_aval, plan: _Plan):
    self.in_avals = (*qkv_avals, hijax.ShapedArray(qkv_avals[0].shape, qkv_avals[0].dtype), lse_aval)
    self.out_aval = hijax.ShapedArray(qkv_avals[0].shape, qkv_avals[0].dtype)
    self.params = dict(plan=plan)
    super().__init__()

  def expand(self, q, k, v, o, lse):
    return o

  def vjp_fwd(self, nzs_in, q, k, v, o, lse):
    del nzs_in
    return o, (q, k, v, o, lse)

  def vjp_bwd_retval(self, res, do):
    dq, dk, dv = _backward(self.plan, res, do)
    o, lse = res[3:]
    return dq, dk, dv, jnp.zeros_like(o), jnp.zeros_like(lse)

  def jvp(self, primals, tangents):
    q, k, v = primals[:3]
    return _FlashAttention(*self.in_avals[:3], self.plan).jvp((q, k, v), tangents[:3])


def _validate(q, k, v, mask, sm_scale, implementation):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"flash_attention: {name} must be [B, L, H, D], got shape {tuple(x.shape)}.")
  if k.shape != v.shape:
    raise ValueError(f"flash_attention: k and v must have the same shape [B, Lk, Hkv, D], got "
                     f"k {tuple(k.shape)} and v {tuple(v.shape)}.")
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"flash_attention: batch of q ({q.shape[0]}) != batch of k/v ({k.shape[0]}).")
  if q.shape[3] != k.shape[3]:
    raise ValueError(f"flash_attention: head dim of q ({q.shape[3]}) != head dim of k/v ({k.shape[3]}).")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"flash_attention: q heads ({q.shape[2]}) must be a multiple of k/v heads "
                     f"({k.shape[2]}).")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"flash_attention: q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, "
                     f"v {v.dtype}.")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"flash_attention: implementation must be one of {IMPLEMENTATIONS}, got "
                     f"{implementation!r}.")
  if mask is not None:
    if not isinstance(mask, Mask):
      raise ValueError(f"flash_attention: mask must be a pallas_kernels.Mask (static), got {type(mask)}.")
    if mask.shape != (q.shape[1], k.shape[1]):
      raise ValueError(f"flash_attention: mask shape {mask.shape} != (Lq, Lk) = {(q.shape[1], k.shape[1])}.")
  if sm_scale is not None and not isinstance(sm_scale, (int, float, np.floating)):
    raise ValueError(f"flash_attention: sm_scale must be a Python float (static), got {type(sm_scale)}.")
  if implementation == "pallas":
    if q.shape[3] > max(SUPPORTED_HEAD_DIMS):
      raise ValueError(f"flash_attention: head dim D={q.shape[3]} is not supported by the Pallas kernels; "
                       f"supported: D <= {max(SUPPORTED_HEAD_DIMS)} (smaller D is zero-padded to one of "
                       f"{SUPPORTED_HEAD_DIMS}), or pass implementation='xla'.")
    if q.dtype not in SUPPORTED_DTYPES:
      raise ValueError(f"flash_attention: dtype {q.dtype} is not supported; supported: "
                       f"{[jnp.dtype(d).name for d in SUPPORTED_DTYPES]}.")


def _hopper_gpu() -> bool:
  if jax.default_backend() != "gpu":
    return False
  cc = str(getattr(jax.devices()[0], "compute_capability", ""))
  return cc.split(".")[0] == "9"


def resolve_backend(backend: str | None, dtype, head_dim: int, mask: Mask, lq: int, lk: int,
                    interpret: bool) -> str:
  """The kernels a call runs: "triton", "mosaic" (forward, backward and JVP) or "mosaic_fwd" (Mosaic forward,
  Triton backward and JVP); see the module docstring.

  backend: "auto" / "triton" / "mosaic" / "mosaic_fwd", or None for the `RCM_FLASH_BACKEND` environment variable
  (default "auto"). head_dim is the padded one (64 or 128).
  """
  source = "backend"
  if backend is None:
    backend, source = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto", BACKEND_ENV
  if backend not in BACKENDS:
    raise UserError(f"flash_attention: {source}={backend!r} is not one of {BACKENDS}; set it to one of them.")
  if backend == "triton":
    return "triton"
  why = None
  if interpret:
    why = "interpret mode (CPU) runs the portable Triton kernels only"
  elif not _hopper_gpu():
    why = (f"the device is {jax.default_backend()} "
           f"{getattr(jax.devices()[0], 'device_kind', '')!s}, not a compute capability 9.x (Hopper) GPU")
  elif jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
    why = f"dtype {jnp.dtype(dtype).name} (the Mosaic kernels are bf16 only)"
  else:
    why = mosaic.unsupported_reason(dtype, head_dim, mask, lq, lk)
  if why is None:
    return "mosaic_fwd" if backend == "mosaic_fwd" else "mosaic"
  if backend != "auto":
    raise UserError(f"flash_attention: {source}={backend!r} cannot run this call: {why}. Use 'auto' or 'triton'.")
  return "triton"


def flash_attention(q, k, v, mask: Mask | None = None, *, sm_scale: float | None = None,
                    interpret: bool | None = None, implementation: str = "pallas",
                    block_sizes: BlockSizes | None = None, backend: str | None = None):
  """Block-sparse masked attention with forward, backward and fused forward+JVP kernels.

  q: [B, Lq, H, D]; k, v: [B, Lk, Hkv, D] with Hkv | H (grouped heads); D in SUPPORTED_HEAD_DIMS;
  bf16 / f32 (fp32 accumulation and softmax statistics). mask: a static `Mask` of shape
  (Lq, Lk) or None (full attention). Fully masked query rows return zeros. sm_scale defaults to
  D ** -0.5. interpret=None uses Pallas interpret mode when the default backend is the CPU.
  implementation: "pallas" (default) or "xla" (`pallas_kernels.reference.attention`, materialises
  the [Lq, Lk] scores). block_sizes: tile/launch overrides (tuning; see `kernels.BlockSizes`).
  backend: forward/backward kernels, "auto" (Mosaic GPU on Hopper for bf16, else Triton), "triton",
  "mosaic" or "mosaic_fwd"; None reads the `RCM_FLASH_BACKEND` environment variable (default "auto").
  Returns [B, Lq, H, D] in q.dtype. Differentiable with `jax.grad` and `jax.jvp` (see module doc).
  """
  _validate(q, k, v, mask, sm_scale, implementation)
  scale = float(q.shape[3] ** -0.5 if sm_scale is None else sm_scale)
  if implementation == "xla":
    return reference.attention(q, k, v, mask, sm_scale=scale)
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  lq, lk = q.shape[1], k.shape[1]
  if mask is None:
    mask = Mask.full(lq, lk)
  d = q.shape[3]
  d_pad = _head_dim_pad(d)
  if d_pad != d:
    # Zero columns change neither q.k nor the softmax, and give zero output columns (sliced off below);
    # pad/slice are linear, so grad and jvp pass through them. Costs (d_pad / d)x the matmul work.
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, d_pad - d)))
    q, k, v = pad(q), pad(k), pad(v)
  kernels_used = resolve_backend(backend, q.dtype, d_pad, mask, lq, lk, bool(interpret))
  plan = _Plan(mask, lq, lk, scale, block_sizes or BlockSizes.default_for(q.dtype), bool(interpret), kernels_used)
  o = _FlashAttention(jax.typeof(q), jax.typeof(k), jax.typeof(v), plan)(q, k, v)
  return o[..., :d]


def flash_attention_stacked(q, k, v, index, mask: Mask | None = None, *, sm_scale: float | None = None,
                            interpret: bool | None = None, backend: str | None = None):
  """Forward-only attention of q [B, Lq, H, D] against entry `index` (an int32 scalar, may be traced) of stacked
  k/v [N, B, Lk, Hkv, D]: a streaming KV cache of every layer, read by layer index.

  Where the Mosaic forward kernel runs (Hopper, bf16, D = 64 or 128, Lk a multiple of its key tile), it reads
  the stack in place; elsewhere entry `index` is sliced out (a copy) and `flash_attention` runs on it. It has
  no derivative rules: it serves inference, where slicing a layer's cache for the kernel would copy it every
  call (training differentiates `flash_attention` on per-layer k/v). mask may also be a run-time `KeyIntervals`
  (the same key intervals for every query row, traced): the kernels then build their tile lists in the graph,
  so one compiled function serves every such mask. Arguments otherwise as `flash_attention`.
  """
  if k.ndim != 5 or v.shape != k.shape:
    raise ValueError(f"flash_attention_stacked: k and v must be stacks [N, B, Lk, Hkv, D] of one shape, got "
                     f"k {tuple(k.shape)} and v {tuple(v.shape)}.")
  entry = lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
  runtime = isinstance(mask, KeyIntervals)
  _validate(q, entry(k), entry(v), None if runtime else mask, sm_scale, "pallas")
  lq, lk, d = q.shape[1], k.shape[2], q.shape[3]
  if runtime and (mask.shape != (lq, lk) or np.shape(mask.intervals)[1:] != (2,)):
    raise ValueError(f"flash_attention_stacked: {mask} must be (Lq, Lk) = {(lq, lk)} with intervals [R, 2].")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  full = Mask.full(lq, lk) if mask is None else mask
  scale = float(d ** -0.5 if sm_scale is None else sm_scale)
  if (d in SUPPORTED_HEAD_DIMS and lk % mosaic.MosaicConfig().block_k == 0
      and resolve_backend(backend, q.dtype, d, full, lq, lk, bool(interpret)) != "triton"):
    return mosaic.forward(q, k, v, full, sm_scale=scale, kv_index=index, unpadded_o=True)[0]
  take = lambda x: jax.lax.dynamic_index_in_dim(x, index, 0, keepdims=False)
  if runtime:
    return _runtime_forward(q, take(k), take(v), mask, scale, bool(interpret))
  return flash_attention(q, take(k), take(v), mask, sm_scale=sm_scale, interpret=interpret, backend=backend)


def _runtime_forward(q, k, v, mask: KeyIntervals, scale: float, interpret: bool):
  """The Triton forward kernel under a run-time `KeyIntervals` mask (its tile lists built in the graph):
  q [B, Lq, H, D], k/v [B, Lk, Hkv, D] -> o [B, Lq, H, D]. Forward only."""
  lq, lk, d = q.shape[1], k.shape[1], q.shape[3]
  d_pad = _head_dim_pad(d)
  cfg = _shrink(BlockSizes.default_for(q.dtype).fwd, lq, lk)
  lq_pad, lk_pad = _round_up(lq, cfg.block_q), _round_up(lk, cfg.block_k)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, d_pad - d)))
  sched = runtime_schedule(mask, lq_pad, lk_pad, cfg.block_q, cfg.block_k)
  o, _ = kernels.forward(pad(q, lq_pad), pad(k, lk_pad), pad(v, lk_pad), sched, cfg, sm_scale=scale,
                         interpret=interpret)
  return o[:, :lq, :, :d]
