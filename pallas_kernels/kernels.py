"""Pallas kernels (Triton-style, portable to interpret mode): forward, backward dq, backward dk/dv, fused JVP.

Every function here takes padded arrays (Lq_pad, Lk_pad multiples of the tiles) and a `TileSchedule`;
padding, validation and autodiff wiring live in `attention.py`. Layout is the model's own
[B, L, H, D]; a program owns one (query tile, batch, head) -- or (key tile, batch, head) for dk/dv --
and loops over the non-empty tiles its schedule lists: first the partial tiles (element mask on),
then the full ones (no mask code at all). Scores run in base 2 (`exp2`, scale folded with log2 e);
the saved statistic is `lse2 = m2 + log2(l)` per row.

Tiles: `BlockSizes` holds one (block_q, block_k, num_warps, num_stages) per kernel; the defaults come
from an H100 sweep (benchmarks/RESULTS.md), with half-size tiles for f32 inputs (shared memory).

Fully masked rows never produce NaN: the running max starts at a finite MASK_VALUE, probabilities
of masked entries are zeroed explicitly, `l = 0` rows output 0 and store `lse2 = +BIG`, so
backward probabilities `exp2(s2 - lse2)` vanish on them.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.mask import TileSchedule

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
BIG = 1e30  # lse2 of a fully masked row
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Tile sizes and Triton launch parameters for one kernel family (all powers of two)."""
  block_q: int = 128
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Per-kernel configs; Lq_pad, Lk_pad are multiples of the largest tiles of the four.

  Defaults: the best of a sweep at L=16384, H=12, D=128, bf16 on one H100 (benchmarks/RESULTS.md).
  """
  fwd: KernelConfig = KernelConfig(128, 128, 8, 3)
  bwd_dq: KernelConfig = KernelConfig(64, 64, 4, 2)
  bwd_dkdv: KernelConfig = KernelConfig(64, 64, 4, 2)
  jvp: KernelConfig = KernelConfig(128, 64, 8, 2)

  def all(self):
    return (self.fwd, self.bwd_dq, self.bwd_dkdv, self.jvp)

  @classmethod
  def default_for(cls, dtype) -> "BlockSizes":
    """4-byte inputs double every shared-memory buffer: half-size tiles keep them under H100's 227 KB."""
    if jnp.dtype(dtype).itemsize < 4:
      return cls()
    return cls(KernelConfig(64, 64, 4, 2), KernelConfig(64, 32, 4, 2), KernelConfig(32, 64, 4, 2),
               KernelConfig(64, 32, 4, 2))


def _dot(a, b, trans_b=False):
  return plgpu.dot(a, b, trans_b=trans_b)


def _element_mask(mask_refs, mode, q0, k0, bq, bk):
  """bool [bq, bk]: which (row q0+i, key k0+j) pairs are allowed (partial tiles only)."""
  if mode == "dense":
    (dense_ref,) = mask_refs
    return dense_ref[pl.ds(q0, bq), pl.ds(k0, bk)] != 0
  starts_ref, ends_ref = mask_refs
  cols = (k0 + jnp.arange(bk, dtype=jnp.int32))[None, :]
  allowed = None
  for r in range(starts_ref.shape[0]):
    s = starts_ref[r, pl.ds(q0, bq)][:, None]
    e = ends_ref[r, pl.ds(q0, bq)][:, None]
    a = (cols >= s) & (cols < e)
    allowed = a if allowed is None else allowed | a
  return allowed


def _schedule_arrays(sched: TileSchedule, rowmajor: bool):
  if rowmajor:
    arrays = (sched.kv_tiles, sched.kv_partial, sched.kv_full)
  else:
    arrays = (sched.q_tiles, sched.q_partial, sched.q_full)
  return [jnp.asarray(a) for a in arrays]


def _mask_inputs(sched: TileSchedule):
  return [jnp.asarray(a) for a in sched.mask_arrays]


def _whole(shape):
  """BlockSpec of a whole small array shared by every program (schedules, masks)."""
  nd = len(shape)
  return pl.BlockSpec(shape, lambda *_: (0,) * nd)


def _online_softmax_tile(kt, q, k_ref, v_ref, m, mask_refs, mode, q0, bq, bk, scale2, masked):
  """One key tile of the online softmax, shared by the forward and the fused JVP kernels.

  Loads key tile `kt`, forms base-2 logits (element mask on partial tiles only) and returns
  (k0, k, v, p~ [bq, bk] unnormalised probabilities, alpha [bq] rescale of the running sums, m_new [bq]).
  """
  k0 = pl.multiple_of(kt * bk, bk)
  k = k_ref[pl.ds(k0, bk), :]
  v = v_ref[pl.ds(k0, bk), :]
  s = _dot(q, k, trans_b=True) * scale2  # [bq, bk] f32, base-2 logits
  if masked:
    allowed = _element_mask(mask_refs, mode, q0, k0, bq, bk)
    s = jnp.where(allowed, s, MASK_VALUE)
  m_new = jnp.maximum(m, s.max(axis=1))
  alpha = jnp.exp2(m - m_new)
  p = jnp.exp2(s - m_new[:, None])
  if masked:
    p = jnp.where(allowed, p, 0.0)
  return k0, k, v, p, alpha, m_new


# ---------------------------------------------------------------------------------------------------
# Forward: o [B, Lq_pad, H, D] and lse2 [B, H, Lq_pad].
# ---------------------------------------------------------------------------------------------------

def _fwd_kernel(tiles_ref, npart_ref, nfull_ref, q_ref, k_ref, v_ref, *rest, scale2, width, mode, bk,
                n_mask):
  mask_refs, (o_ref, lse_ref) = rest[:n_mask], rest[n_mask:]
  bq, d = q_ref.shape
  i = pl.program_id(0)
  q0 = i * bq
  q = q_ref[...]

  def body(j, carry, masked):
    acc, m, l = carry
    k0, k, v, p, alpha, m_new = _online_softmax_tile(tiles_ref[i * width + j], q, k_ref, v_ref, m, mask_refs,
                                                     mode, q0, bq, bk, scale2, masked)
    l = alpha * l + p.sum(axis=1)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l

  n_p = npart_ref[i]
  n_f = nfull_ref[i]
  carry = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32),
           jnp.zeros((bq,), jnp.float32))
  carry = lax.fori_loop(0, n_p, functools.partial(body, masked=True), carry)
  acc, m, l = lax.fori_loop(n_p, n_p + n_f, functools.partial(body, masked=False), carry)
  empty = l == 0.0
  inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
  o_ref[...] = (acc * inv[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, BIG, m + jnp.log2(jnp.where(empty, 1.0, l)))


def forward(q, k, v, sched: TileSchedule, cfg: KernelConfig, *, sm_scale: float, interpret: bool):
  """q [B, Lq_pad, H, D], k/v [B, Lk_pad, Hkv, D] -> (o [B, Lq_pad, H, D], lse2 [B, H, Lq_pad] f32)."""
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  g = h // hkv
  bq, bk = cfg.block_q, cfg.block_k
  nq = lq // bq
  sched_arrays = _schedule_arrays(sched, rowmajor=True)
  mask_arrays = _mask_inputs(sched)
  kernel = functools.partial(_fwd_kernel, scale2=sm_scale * LOG2E, width=sched.wq, mode=sched.mode,
                             bk=bk, n_mask=len(mask_arrays))
  in_specs = [_whole(a.shape) for a in sched_arrays] + [
      pl.BlockSpec((None, bq, None, d), lambda i, bb, hh: (bb, i, hh, 0)),
      pl.BlockSpec((None, lk, None, d), lambda i, bb, hh: (bb, 0, hh // g, 0)),
      pl.BlockSpec((None, lk, None, d), lambda i, bb, hh: (bb, 0, hh // g, 0)),
  ] + [_whole(a.shape) for a in mask_arrays]
  out_specs = [pl.BlockSpec((None, bq, None, d), lambda i, bb, hh: (bb, i, hh, 0)),
               pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, i))]
  return pl.pallas_call(
      kernel, grid=(nq, b, h), in_specs=in_specs, out_specs=out_specs,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, lq), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret, name="flash_fwd",
  )(*sched_arrays, q, k, v, *mask_arrays)


# ---------------------------------------------------------------------------------------------------
# Backward. delta = rowsum(dO * O) comes from XLA (one cheap elementwise pass).
# dq: one program per query tile, row-major schedule. dk/dv: one program per (key tile, q head),
# column-major schedule; with grouped heads the per-q-head dk/dv are summed over the group outside.
# ---------------------------------------------------------------------------------------------------

def _dq_kernel(tiles_ref, npart_ref, nfull_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest,
               scale, scale2, width, mode, bk, n_mask):
  mask_refs, (dq_ref,) = rest[:n_mask], rest[n_mask:]
  bq, d = q_ref.shape
  i = pl.program_id(0)
  q0 = i * bq
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]

  def body(j, dq, masked):
    kt = tiles_ref[i * width + j]
    k0 = pl.multiple_of(kt * bk, bk)
    k = k_ref[pl.ds(k0, bk), :]
    v = v_ref[pl.ds(k0, bk), :]
    p = jnp.exp2(_dot(q, k, trans_b=True) * scale2 - lse[:, None])
    if masked:
      p = jnp.where(_element_mask(mask_refs, mode, q0, k0, bq, bk), p, 0.0)
    dp = _dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  n_p = npart_ref[i]
  n_f = nfull_ref[i]
  dq = jnp.zeros((bq, d), jnp.float32)
  dq = lax.fori_loop(0, n_p, functools.partial(body, masked=True), dq)
  dq = lax.fori_loop(n_p, n_p + n_f, functools.partial(body, masked=False), dq)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(tiles_ref, npart_ref, nfull_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest,
                 scale, scale2, width, mode, bq, n_mask):
  mask_refs, (dk_ref, dv_ref) = rest[:n_mask], rest[n_mask:]
  bk, d = k_ref.shape
  jk = pl.program_id(0)
  k0 = jk * bk
  k = k_ref[...]
  v = v_ref[...]

  def body(j, carry, masked):
    dk, dv = carry
    qt = tiles_ref[jk * width + j]
    q0 = pl.multiple_of(qt * bq, bq)
    q = q_ref[pl.ds(q0, bq), :]
    do = do_ref[pl.ds(q0, bq), :]
    lse = lse_ref[pl.ds(q0, bq)]
    delta = delta_ref[pl.ds(q0, bq)]
    p = jnp.exp2(_dot(q, k, trans_b=True) * scale2 - lse[:, None])  # [bq, bk]
    if masked:
      p = jnp.where(_element_mask(mask_refs, mode, q0, k0, bq, bk), p, 0.0)
    dv = dv + _dot(p.astype(do.dtype).T, do)
    dp = _dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None])
    dk = dk + _dot(ds.astype(q.dtype).T, q)
    return dk, dv

  n_p = npart_ref[jk]
  n_f = nfull_ref[jk]
  carry = (jnp.zeros((bk, d), jnp.float32), jnp.zeros((bk, d), jnp.float32))
  carry = lax.fori_loop(0, n_p, functools.partial(body, masked=True), carry)
  dk, dv = lax.fori_loop(n_p, n_p + n_f, functools.partial(body, masked=False), carry)
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def softmax_delta(o, do):
  """delta = rowsum(dO * O) [B, H, L] f32 for the backward kernels, from o, do [B, L, H, D].

  An elementwise product and a sum over D, then a transpose of the small [B, L, H] result. Written as
  einsum("blhd,blhd->bhl") it is a batched dot whose batch dims XLA lays out major: that layout then spread
  back to o, which is saved per layer under remat, and cost a transpose of the whole saved stack after the
  forward and a transpose back of each layer's slice in the backward (about 40 ms of a 3.1 s Wan TF step on
  an H100, in its profile)."""
  return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1).transpose(0, 2, 1)


def backward(q, k, v, o, lse, do, sched_dq: TileSchedule, sched_dkdv: TileSchedule,
             cfg_dq: KernelConfig, cfg_dkdv: KernelConfig, *, sm_scale: float, interpret: bool):
  """Padded q, o, do [B, Lq_pad, H, D]; k, v [B, Lk_pad, Hkv, D]; lse2 [B, H, Lq_pad] -> dq, dk, dv."""
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  g = h // hkv
  delta = softmax_delta(o, do)
  common = dict(scale=sm_scale, scale2=sm_scale * LOG2E)
  params = lambda cfg: plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)

  # dq
  bq, bk = cfg_dq.block_q, cfg_dq.block_k
  sched_arrays = _schedule_arrays(sched_dq, rowmajor=True)
  mask_arrays = _mask_inputs(sched_dq)
  qspec = pl.BlockSpec((None, bq, None, d), lambda i, bb, hh: (bb, i, hh, 0))
  kvspec = pl.BlockSpec((None, lk, None, d), lambda i, bb, hh: (bb, 0, hh // g, 0))
  rowspec = pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, width=sched_dq.wq, mode=sched_dq.mode, bk=bk,
                        n_mask=len(mask_arrays), **common),
      grid=(lq // bq, b, h),
      in_specs=[_whole(a.shape) for a in sched_arrays] + [qspec, kvspec, kvspec, qspec, rowspec, rowspec]
      + [_whole(a.shape) for a in mask_arrays],
      out_specs=qspec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params(cfg_dq), interpret=interpret, name="flash_bwd_dq",
  )(*sched_arrays, q, k, v, do, lse, delta, *mask_arrays)

  # dk, dv (per q head; summed over the group below when Hkv < H)
  bq, bk = cfg_dkdv.block_q, cfg_dkdv.block_k
  sched_arrays = _schedule_arrays(sched_dkdv, rowmajor=False)
  mask_arrays = _mask_inputs(sched_dkdv)
  qspec = pl.BlockSpec((None, lq, None, d), lambda j, bb, hh: (bb, 0, hh, 0))
  kvspec = pl.BlockSpec((None, bk, None, d), lambda j, bb, hh: (bb, j, hh // g, 0))
  outspec = pl.BlockSpec((None, bk, None, d), lambda j, bb, hh: (bb, j, hh, 0))
  rowspec = pl.BlockSpec((None, None, lq), lambda j, bb, hh: (bb, hh, 0))
  out_dtype = k.dtype if g == 1 else jnp.float32
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, width=sched_dkdv.wk, mode=sched_dkdv.mode, bq=bq,
                        n_mask=len(mask_arrays), **common),
      grid=(lk // bk, b, h),
      in_specs=[_whole(a.shape) for a in sched_arrays] + [qspec, kvspec, kvspec, qspec, rowspec, rowspec]
      + [_whole(a.shape) for a in mask_arrays],
      out_specs=[outspec, outspec],
      out_shape=[jax.ShapeDtypeStruct((b, lk, h, d), out_dtype)] * 2,
      compiler_params=params(cfg_dkdv), interpret=interpret, name="flash_bwd_dkdv",
  )(*sched_arrays, q, k, v, do, lse, delta, *mask_arrays)
  if g > 1:
    dk = dk.reshape(b, lk, hkv, g, d).sum(3).astype(k.dtype)
    dv = dv.reshape(b, lk, hkv, g, d).sum(3).astype(v.dtype)
  return dq, dk, dv


# ---------------------------------------------------------------------------------------------------
# Fused forward + JVP (online-softmax form; math in ../shared/reference/pallas_gpu.md):
#   dS = s (dQ K^T + Q dK^T);  l <- a l + sum P~;  O~ <- a O~ + P~ V;
#   G <- a G + P~ dV + (P~ * dS) V;  r <- a r + sum(P~ * dS);  O = O~/l, dO = G/l - (r/l) O.
# Tangents that are symbolic zeros are left out at trace time (static flags).
# ---------------------------------------------------------------------------------------------------

def _jvp_kernel(tiles_ref, npart_ref, nfull_ref, *refs, scale, scale2, width, mode, bk, n_mask,
                has_dq, has_dk, has_dv):
  refs = list(refs)
  q_ref, k_ref, v_ref = refs[:3]
  pos = 3
  dq_ref = dk_ref = dv_ref = None
  if has_dq:
    dq_ref, pos = refs[pos], pos + 1
  if has_dk:
    dk_ref, pos = refs[pos], pos + 1
  if has_dv:
    dv_ref, pos = refs[pos], pos + 1
  mask_refs = refs[pos:pos + n_mask]
  o_ref, to_ref = refs[pos + n_mask:]
  bq, d = q_ref.shape
  i = pl.program_id(0)
  q0 = i * bq
  q = q_ref[...]
  tq = dq_ref[...] if has_dq else None
  has_ds = has_dq or has_dk

  def body(j, carry, masked):
    acc, gacc, m, l, r = carry
    k0, k, v, p, alpha, m_new = _online_softmax_tile(tiles_ref[i * width + j], q, k_ref, v_ref, m, mask_refs,
                                                     mode, q0, bq, bk, scale2, masked)
    l = alpha * l + p.sum(axis=1)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    gacc = gacc * alpha[:, None]
    if has_dv:
      gacc = gacc + _dot(p.astype(v.dtype), dv_ref[pl.ds(k0, bk), :])
    if has_ds:
      ds = None
      if has_dq:
        ds = _dot(tq, k, trans_b=True)
      if has_dk:
        t = _dot(q, dk_ref[pl.ds(k0, bk), :], trans_b=True)
        ds = t if ds is None else ds + t
      pds = p * (ds * scale)
      r = alpha * r + pds.sum(axis=1)
      gacc = gacc + _dot(pds.astype(v.dtype), v)
    return acc, gacc, m_new, l, r

  n_p = npart_ref[i]
  n_f = nfull_ref[i]
  zrow = jnp.zeros((bq,), jnp.float32)
  carry = (jnp.zeros((bq, d), jnp.float32), jnp.zeros((bq, d), jnp.float32),
           jnp.full((bq,), MASK_VALUE, jnp.float32), zrow, zrow)
  carry = lax.fori_loop(0, n_p, functools.partial(body, masked=True), carry)
  acc, gacc, m, l, r = lax.fori_loop(n_p, n_p + n_f, functools.partial(body, masked=False), carry)
  empty = l == 0.0
  inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
  o = acc * inv[:, None]
  o_ref[...] = o.astype(o_ref.dtype)
  to_ref[...] = (gacc * inv[:, None] - (r * inv)[:, None] * o).astype(to_ref.dtype)


def forward_jvp(q, k, v, tq, tk, tv, sched: TileSchedule, cfg: KernelConfig, *, sm_scale: float,
                interpret: bool):
  """Padded primals and tangents (None = symbolic zero) -> (o, o_dot), both [B, Lq_pad, H, D]."""
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  g = h // hkv
  bq, bk = cfg.block_q, cfg.block_k
  sched_arrays = _schedule_arrays(sched, rowmajor=True)
  mask_arrays = _mask_inputs(sched)
  qspec = pl.BlockSpec((None, bq, None, d), lambda i, bb, hh: (bb, i, hh, 0))
  kvspec = pl.BlockSpec((None, lk, None, d), lambda i, bb, hh: (bb, 0, hh // g, 0))
  tangents = [(t, s) for t, s in ((tq, qspec), (tk, kvspec), (tv, kvspec)) if t is not None]
  kernel = functools.partial(
      _jvp_kernel, scale=sm_scale, scale2=sm_scale * LOG2E, width=sched.wq, mode=sched.mode, bk=bk,
      n_mask=len(mask_arrays), has_dq=tq is not None, has_dk=tk is not None, has_dv=tv is not None)
  return pl.pallas_call(
      kernel, grid=(lq // bq, b, h),
      in_specs=[_whole(a.shape) for a in sched_arrays] + [qspec, kvspec, kvspec]
      + [s for _, s in tangents] + [_whole(a.shape) for a in mask_arrays],
      out_specs=[qspec, qspec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)] * 2,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret, name="flash_fwd_jvp",
  )(*sched_arrays, q, k, v, *[t for t, _ in tangents], *mask_arrays)
