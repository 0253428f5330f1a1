"""Hopper (sm_90) forward kernel in Pallas Mosaic GPU: o and lse2 of block-sparse masked attention, bf16.

This file owns the Mosaic GPU path of the forward pass (`forward`) and the test of whether a call can take
it (`unsupported_reason`). `attention.py` picks it on compute capability 9.x GPUs for bf16 forward calls
(plain evaluation and the VJP's forward); the backward (dq, dk/dv) and the fused forward+JVP stay on the
Triton kernels in `kernels.py`, and so does everything in interpret mode (CPU tests).

Structure (FlashAttention-3 style, written for our `TileSchedule`s): one CTA per (q head, 128-row query
tile, batch) with three warpgroups. Warpgroup 2 is the producer: it walks the tile's schedule (partial key
tiles first, then full ones) and TMA-copies each K and V tile into a ring of `stages` shared-memory slots,
waiting on "consumed" barriers before reusing a slot. Warpgroups 0 and 1 each own 64 query rows of the
tile and run the online softmax over the same key tiles: S = Q K^T by wgmma (Q and K from swizzled shared
memory, fp32 accumulators in registers), base-2 softmax statistics in fp32, then O += P V by wgmma with P
from registers. A shared "schedule" barrier staggers the two consumers so one's softmax overlaps the
other's matmuls. Partial tiles apply the element mask from the schedule's per-row key intervals
(`starts/ends [R, Lq]`: R compare-and-selects against a column iota); full tiles run no mask code.

Numerics match `kernels.forward`: masked logits are -inf, the running max starts at the finite
`MASK_VALUE` (so a row with nothing allowed yet keeps p = 0, never NaN), fully masked rows give o = 0 and
lse2 = BIG. lse2 = m2 + log2(l) in base 2, [B, H, Lq], the layout the Triton backward reads.

Limits (callers check `unsupported_reason` first): bf16 (or f16) inputs, D in {64, 128}, interval-mode
schedules with at most `MAX_INTERVALS` intervals per row (dense random masks stay on Triton).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.kernels import BIG, LOG2E, MASK_VALUE  # the Triton kernels' constants (same lse2)
from pallas_kernels.mask import Mask, TileSchedule, tile_schedule

MAX_INTERVALS = 4  # per-row key intervals held in registers (video masks need <= 3)
ROWS_PER_WG = 64  # one wgmma M tile per consumer warpgroup
COMPUTE_WGS = 2


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """block_k: key tile (a multiple of 64); stages: K/V shared-memory ring depth (>= 2)."""
  block_k: int = 128
  stages: int = 2

  @property
  def block_q(self) -> int:
    return ROWS_PER_WG * COMPUTE_WGS


def _round_up(x, m):
  return -(-x // m) * m


def unsupported_reason(dtype, head_dim: int, mask: Mask, lq: int, lk: int,
                       cfg: MosaicConfig = MosaicConfig()) -> str | None:
  """None if `forward` handles this call, else a short reason (for the dispatch and error messages)."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(dtype).name} (the Mosaic kernel is bf16/f16 only)"
  if head_dim not in (64, 128):
    return f"head dim {head_dim} (the Mosaic kernel takes 64 or 128)"
  sched = _schedule(mask, lq, lk, cfg)
  if sched.mode != "intervals":
    return "a dense element mask with many runs per row (only interval masks are supported)"
  if sched.mask_arrays[0].shape[0] > MAX_INTERVALS:
    return f"{sched.mask_arrays[0].shape[0]} key intervals per row (at most {MAX_INTERVALS})"
  return None


def _schedule(mask: Mask, lq: int, lk: int, cfg: MosaicConfig) -> TileSchedule:
  return tile_schedule(mask, _round_up(lq, cfg.block_q), _round_up(lk, cfg.block_k), cfg.block_q, cfg.block_k)


def _pad_len(x, length):
  return x if x.shape[1] == length else jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def _kernel(tiles_ref, npart_ref, nfull_ref, iv_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
            smem, bars, free_bars, sched_bar, *, plgpu, pl, scale2, width, block_k, stages, group, n_iv,
            regs=True):
  """One CTA: 2 consumer warpgroups x 64 query rows, 1 producer warpgroup (see module docstring).

  regs=False is the CPU-interpreter variant: no register reallocation, and P V goes to a fresh
  accumulator that is then added (the interpreter lacks those two primitives); barriers, copies, the
  schedule walk and the masking are the same code."""
  qo_smem2, k_smem, v_smem, lse_smem2, iv_smem2, *p_smem2 = smem
  k_bars, v_bars, q_bars, iv_bars = bars
  k_free, v_free = free_bars
  bq, d = ROWS_PER_WG, q_ref.shape[-1]
  dtype = q_ref.dtype
  b = lax.axis_index("batch")
  h = lax.axis_index("heads")
  qi = lax.axis_index("q_seq")
  wg = lax.axis_index("wg")
  base = qi * width
  n_p = npart_ref[qi]
  n = n_p + nfull_ref[qi]

  def sched_sync():
    plgpu.barrier_arrive(sched_bar)
    plgpu.barrier_wait(sched_bar)

  @pl.when(wg < COMPUTE_WGS)
  def _consumer():
    if regs:  # (the CPU interpreter has no register file)
      plgpu.set_max_registers(232, action="increase")
    qo_smem = qo_smem2.at[wg]
    lse_smem = lse_smem2.at[wg]
    q0 = qi * (COMPUTE_WGS * bq) + wg * bq
    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), h], qo_smem, q_bars.at[wg])
    plgpu.copy_gmem_to_smem(iv_ref.at[:, pl.ds(q0, bq)], iv_smem2.at[wg], iv_bars.at[wg])
    row = plgpu.Layout.WGMMA.reduce(1)
    plgpu.barrier_wait(iv_bars.at[wg])
    ivs = [(plgpu.load(iv_smem2.at[wg, r], layout=row), plgpu.load(iv_smem2.at[wg, n_iv + r], layout=row))
           for r in range(n_iv)]  # (start, end) per row, [64] int32 each
    plgpu.barrier_wait(q_bars.at[wg])

    m = plgpu.layout_cast(jnp.full((bq,), MASK_VALUE, jnp.float32), row)
    l = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), row)
    acc = plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), plgpu.Layout.WGMMA)

    @pl.when(n > 0)
    def _():
      plgpu.barrier_wait(k_bars.at[0])

    pl.when(wg == 1)(sched_sync)

    def step(j, carry, masked):
      acc, m, l = carry
      slot = lax.rem(j, stages)

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
        sched_sync()
        return acc_ref[...]

      s = pl.run_scoped(qk, plgpu.ACC((bq, block_k), jnp.float32))  # [64, bk] raw logits
      plgpu.barrier_arrive(k_free.at[slot])
      if masked:
        k0 = tiles_ref[base + j] * block_k
        cols = plgpu.broadcasted_iota(jnp.int32, (bq, block_k), 1, layout=plgpu.Layout.WGMMA) + k0
        x = None
        for st, en in ivs:
          other = -jnp.inf if x is None else x
          t = jnp.where(cols < lax.broadcast_in_dim(en, (bq, block_k), [0]), s, other)
          x = jnp.where(cols >= lax.broadcast_in_dim(st, (bq, block_k), [0]), t, other)
        s = x
      m_new = jnp.maximum(m, s.max(axis=1) * scale2)
      alpha = jnp.exp2(m - m_new)
      p = jnp.exp2(s * scale2 - lax.broadcast_in_dim(m_new, s.shape, [0]))
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      l = l * alpha + p.sum(axis=1)
      p16 = p.astype(dtype)
      acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
      plgpu.barrier_arrive(sched_bar)  # softmax done
      plgpu.barrier_wait(v_bars.at[slot])
      plgpu.barrier_wait(sched_bar)  # the other warpgroup has issued its matmul

      def pv(acc_ref):
        plgpu.wgmma(acc_ref, p16 if regs else p_smem2[0].at[wg], v_smem.at[slot])
        nxt = j + 1

        @pl.when(nxt < n)
        def _():
          plgpu.barrier_wait(k_bars.at[lax.rem(nxt, stages)])

      if regs:  # accumulate into the running O in place
        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
      else:  # CPU interpreter: no run_state rule and no register A operand, so P goes through shared
        # memory and P V into a fresh accumulator that is then added
        p_smem2[0].at[wg][...] = p16
        plgpu.commit_smem()
        acc = acc + pl.run_scoped(lambda r: (pv(r), r[...])[1], plgpu.ACC((bq, d), jnp.float32))
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l

    carry = lax.fori_loop(0, n_p, functools.partial(step, masked=True), (acc, m, l))
    acc, m, l = lax.fori_loop(n_p, n, functools.partial(step, masked=False), carry)
    pl.when(wg == 0)(sched_sync)

    l_safe = jnp.maximum(l, 1e-30)  # l == 0 only on fully masked rows, whose acc is 0 too
    acc = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
    qo_smem[...] = acc.astype(dtype)
    lse_smem[...] = jnp.where(l > 0.0, m + jnp.log(l_safe) * LOG2E, BIG)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[b, pl.ds(q0, bq), h])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q0, bq)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == COMPUTE_WGS)
  def _producer():
    if regs:
      plgpu.set_max_registers(40, action="decrease")
    kv_head = lax.div(h, jnp.array(group, h.dtype))

    def issue(j, _):
      slot = lax.rem(j, stages)
      rows = (b, pl.ds(tiles_ref[base + j] * block_k, block_k), kv_head)

      @pl.when(j >= stages)
      def _():
        plgpu.barrier_wait(k_free.at[slot])

      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_bars.at[slot])

      @pl.when(j >= stages)
      def _():
        plgpu.barrier_wait(v_free.at[slot])

      plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_bars.at[slot])
      return _

    lax.fori_loop(0, n, issue, None)


def forward(q, k, v, mask: Mask, *, sm_scale: float, cfg: MosaicConfig = MosaicConfig(), interpret=None):
  """q [B, Lq, H, D], k/v [B, Lk, Hkv, D] (any Lq, Lk; zero-padded here) -> (o [B, Lq, H, D],
  lse2 [B, H, Lq] f32). `mask` has shape (Lq, Lk) or smaller (padded rows/keys beyond it allow nothing).
  interpret: passed to `plgpu.kernel` (jax >= 0.12 has a Mosaic GPU interpreter that runs on the CPU:
  barriers, TMA copies and wgmma emulated; the kernel logic test uses it)."""
  import jax.experimental.pallas as pl  # noqa: PLC0415  (Mosaic GPU imports only where used)
  import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415

  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  lq_m, lk_m = _round_up(lq, cfg.block_q), _round_up(lk, cfg.block_k)
  sched = tile_schedule(mask, lq_m, lk_m, cfg.block_q, cfg.block_k)
  if sched.mode != "intervals" or sched.mask_arrays[0].shape[0] > MAX_INTERVALS:
    raise ValueError(f"mosaic.forward: unsupported mask ({unsupported_reason(q.dtype, d, mask, lq, lk, cfg)}).")
  qp, kp, vp = _pad_len(q, lq_m), _pad_len(k, lk_m), _pad_len(v, lk_m)
  starts, ends = sched.mask_arrays
  n_iv = starts.shape[0]
  iv = jnp.asarray(np.concatenate([starts, ends], 0))  # [2R, Lq_m] int32: starts, then ends
  tiles, npart, nfull = (jnp.asarray(a) for a in (sched.kv_tiles, sched.kv_partial, sched.kv_full))
  stages = cfg.stages
  smem_tf = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  scratch = [
      (plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG, d), q.dtype, transforms=smem_tf),
       plgpu.SMEM((stages, cfg.block_k, d), q.dtype, transforms=smem_tf),
       plgpu.SMEM((stages, cfg.block_k, d), q.dtype, transforms=smem_tf),
       plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG), jnp.float32),
       plgpu.SMEM((COMPUTE_WGS, 2 * n_iv, ROWS_PER_WG), jnp.int32))
      + (() if interpret is None else (plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG, cfg.block_k), q.dtype),)),
      (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
       plgpu.Barrier(num_barriers=COMPUTE_WGS), plgpu.Barrier(num_barriers=COMPUTE_WGS)),
      (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),) * 2,
      plgpu.Barrier(num_arrivals=COMPUTE_WGS),
  ]
  kernel = functools.partial(_kernel, plgpu=plgpu, pl=pl, scale2=sm_scale * LOG2E, width=sched.wq,
                             block_k=cfg.block_k, stages=stages, group=h // hkv, n_iv=n_iv,
                             regs=interpret is None)
  o, lse = plgpu.kernel(
      kernel,
      out_type=[jax.ShapeDtypeStruct((b, lq_m, h, d), q.dtype), jax.ShapeDtypeStruct((b, h, lq_m), jnp.float32)],
      scratch_types=scratch,
      grid=(h, lq_m // cfg.block_q, b),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      **({} if interpret is None else dict(interpret=interpret)),
  )(tiles, npart, nfull, iv, qp, kp, vp)
  return o[:, :lq], lse[:, :, :lq]
