"""Hopper (sm_90) kernels in Pallas Mosaic GPU for block-sparse masked attention, bf16: the forward (o and
lse2), the backward (dq, dk/dv) and the fused forward+JVP (o and its tangent).

This file owns the Mosaic GPU path (`forward`, `backward`, `forward_jvp`) and the test of whether a call can
take it (`unsupported_reason`). `attention.py` picks it on compute capability 9.x GPUs for bf16 calls; the
portable Triton kernels in `kernels.py` serve everything else, interpret mode (CPU tests of the op) included.
The Mosaic kernels themselves also run in jax's Mosaic GPU interpreter on the CPU (`interpret=`), which is
how the tests check their logic. Every kernel hands out its tiles heaviest first (`TileSchedule.kv_order`).

Forward structure (FlashAttention-3 style, written for our `TileSchedule`s): one CTA per (q head, 128-row query
tile, batch) with three warpgroups. Warpgroup 2 is the producer: it walks the tile's schedule (partial key
tiles first, then full ones) and TMA-copies each K and V tile into a ring of `stages` shared-memory slots,
waiting on "consumed" barriers before reusing a slot. Warpgroups 0 and 1 each own 64 query rows of the
tile and run the online softmax over the same key tiles: S = Q K^T by wgmma (Q and K from swizzled shared
memory, fp32 accumulators in registers), base-2 softmax statistics in fp32, then O += P V by wgmma with P
from registers. A shared "schedule" barrier staggers the two consumers so one's softmax overlaps the
other's matmuls. Partial tiles apply the element mask from the schedule's per-row key intervals
(`starts/ends [R, Lq]`: R compare-and-selects against a column iota, or where no two of a row's intervals share
a key tile, as in teacher forcing, one range a row: `_mask_tile`); full tiles run no mask code.
Where a query tile computes few key tiles, `MosaicConfig.persistent_ctas` launches one CTA per SM instead, each
taking work items in turn, the ring's slots counted on across items (`_forward_items`). Where one CTA per item
fills fewer than two waves (a streamed chunk's queries against the KV cache), `MosaicConfig.kv_splits` has
several CTAs share each item's key tiles (split-KV), their partial o and lse2 combined after the kernel
(`_combine_parts`).

Numerics match `kernels.forward`: masked logits are -inf, the running max starts at the finite
`MASK_VALUE` (so a row with nothing allowed yet keeps p = 0, never NaN), fully masked rows give o = 0 and
lse2 = BIG. lse2 = m2 + log2(l) in base 2, [B, H, Lq], the layout the Triton backward reads.

The backward's two kernels and the fused JVP have the same shape; see the comments above `MosaicBwdConfig`
and `MosaicJvpConfig`.

Limits of both (callers check `unsupported_reason` first): bf16 (or f16) inputs, D in {64, 128},
interval-mode schedules with at most `MAX_INTERVALS` intervals per row (dense random masks stay on Triton).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.kernels import BIG, LOG2E, MASK_VALUE, softmax_delta  # shared with the Triton kernels
from pallas_kernels.mask import KeyIntervals, Mask, TileSchedule, runtime_schedule, tile_schedule

MAX_INTERVALS = 4  # per-row key intervals held in registers (video masks need <= 3)
HEAVIEST_FIRST = True  # hand out tiles by decreasing work (`TileSchedule.kv_order`); False: in index order
SINGLE_RUN = True  # the forward's partial tiles of `TileSchedule.single_run` masks: one range a row
# (`_mask_tile`); False: R compare-and-select pairs. On an H100 the same was slower in the dq (3.4-4.1%), dk/dv
# (3.3-3.5%) and JVP (0.5-1.5%) kernels, whose registers are fuller (benchmarks/RESULTS.md), so they keep R pairs.
PERSISTENT_BELOW = 64  # MosaicConfig(persistent_ctas=None): persistent CTAs when a query tile computes fewer key
# tiles than this on average (an H100: 2.7-5.4% faster at 15,600-18,720 masked tokens, 20% slower at 65,520)
ROWS_PER_WG = 64  # one wgmma M tile per consumer warpgroup
COMPUTE_WGS = 2
SMS = 132  # streaming multiprocessors of an H100 / H200: the dk/dv kernel splits its query walk below 4 CTAs each


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """block_k: key tile (a multiple of 64); stages: K/V shared-memory ring depth (>= 2).
  persistent_ctas: 0 launches one CTA per (head, query tile, batch); N > 0 launches N CTAs (an H100 has 132
  SMs) that take those work items in rounds of N, in the heaviest-first order and a snake (`_forward_items`),
  and whose producer runs on into the next item's K/V while the consumers finish the last one (its epilogue,
  the next Q load). None (the default) picks `SMS` where a query tile computes fewer than `PERSISTENT_BELOW`
  key tiles on average, so that each CTA's fixed costs weigh, else 0 (and 0 for run-time masks).
  kv_splits: S > 1 CTAs share each work item of the one-CTA-per-item launch, each walking a part of its key
  tiles into a partial o and lse2, combined after the kernel (split-KV, for grids of fewer than two waves, such
  as one streamed chunk's queries against the KV cache). None (the default) picks S by `_kv_splits`."""
  block_k: int = 128
  stages: int = 2
  persistent_ctas: int | None = None
  kv_splits: int | None = None

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
  if isinstance(mask, KeyIntervals):
    r = np.shape(mask.intervals)[0]
    return None if r <= MAX_INTERVALS else f"{r} key intervals (at most {MAX_INTERVALS})"
  sched = _schedule(mask, lq, lk, cfg)
  if sched.mode != "intervals":
    return "a dense element mask with many runs per row (only interval masks are supported)"
  if sched.mask_arrays[0].shape[0] > MAX_INTERVALS:
    return f"{sched.mask_arrays[0].shape[0]} key intervals per row (at most {MAX_INTERVALS})"
  return None


def _mean_key_tiles(sched: TileSchedule) -> float:
  return float(np.mean(sched.kv_partial + sched.kv_full))


def _persistent_ctas(cfg: MosaicConfig, sched: TileSchedule | None) -> int:
  """cfg.persistent_ctas, or where it is None the rule of `PERSISTENT_BELOW` on the forward's static schedule
  (None: a run-time mask, one CTA per item)."""
  if cfg.persistent_ctas is not None:
    return cfg.persistent_ctas
  return SMS if sched is not None and _mean_key_tiles(sched) < PERSISTENT_BELOW else 0


def _kv_splits(cfg: MosaicConfig, sched: TileSchedule | None, items: int, persistent: int) -> int:
  """cfg.kv_splits, or where it is None: 1 for persistent CTAs, run-time masks and grids of two waves or more
  (`items` work items on `SMS` SMs); else the S <= 8 whose last wave is fullest, keeping >= 16 key tiles a part,
  where that fills the waves >= 10% better than S = 1. 156 items (12 heads x 13 query tiles of one 1,560-token
  chunk) on 132 SMs leave a second wave of 24 CTAs; S = 5 gives 6 waves of 130."""
  if cfg.kv_splits is not None:
    return cfg.kv_splits
  if persistent or sched is None or items >= 2 * SMS:
    return 1
  tiles = _mean_key_tiles(sched)
  fill = lambda s: items * s / (SMS * -(-items * s // SMS))
  best = max((s for s in range(1, 9) if s == 1 or tiles / s >= 16), key=lambda s: (round(fill(s), 6), -s))
  return best if fill(best) >= 1.1 * fill(1) else 1


def _combine_parts(o, lse, splits: int):
  """Partial (o [S * B, Lq, H, D], lse2 [S * B, H, >= Lq]) of S key-tile parts -> (o [B, Lq, H, D], lse2
  [B, H, Lq]), in fp32.
  A part that saw no allowed key of a row has lse2 = BIG there and weight 0; a row no part saw gets o = 0 and
  lse2 = BIG, as from one CTA."""
  o = o.reshape(splits, -1, *o.shape[1:]).astype(jnp.float32)        # [S, B, Lq, H, D]
  lse = lse.reshape(splits, -1, *lse.shape[1:])[..., :o.shape[2]]     # [S, B, H, Lq] (o may be unpadded)
  valid = lse < BIG / 2
  m = jnp.max(jnp.where(valid, lse, -jnp.inf), axis=0)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.where(valid, jnp.exp2(lse - m), 0.0)                        # [S, B, H, Lq]
  total = w.sum(0)
  w_o = jnp.swapaxes(w / jnp.maximum(total, 1e-30), 2, 3)[..., None]   # [S, B, Lq, H, 1]
  return (w_o * o).sum(0), jnp.where(total > 0, m + jnp.log2(jnp.maximum(total, 1e-30)), BIG)


def _schedule(mask: Mask, lq: int, lk: int, cfg: MosaicConfig) -> TileSchedule:
  return tile_schedule(mask, _round_up(lq, cfg.block_q), _round_up(lk, cfg.block_k), cfg.block_q, cfg.block_k)


def _order(heaviest_first):
  return heaviest_first if HEAVIEST_FIRST else np.arange(len(heaviest_first), dtype=np.int32)


def _schedule_inputs(who: str, dtype, d: int, mask: Mask, lq: int, lk: int, lq_m: int, lk_m: int, block_q: int,
                     block_k: int, *, rowmajor: bool):
  """A kernel's schedule operands: ([launch order, tile list, partial counts, full counts, intervals [2R, Lq_m]
  (starts, then ends)], R, list width), from the row lists (forward, dq, JVP) or the column lists (dk/dv).
  A ValueError names `who` where the mask is not an interval mask the kernels take. A `KeyIntervals` mask (row
  lists only) gets its lists built in the graph, every key tile wide, so one executable serves every such mask."""
  if isinstance(mask, KeyIntervals):
    if who != "forward" or unsupported_reason(dtype, d, mask, lq, lk):
      raise ValueError(f"mosaic.{who}: a run-time KeyIntervals mask serves the forward only, with at most "
                       f"{MAX_INTERVALS} intervals (got {mask}).")
    rs = runtime_schedule(mask, lq_m, lk_m, block_q, block_k)
    starts, ends = rs.mask_arrays
    ins = [rs.kv_order, rs.kv_tiles, rs.kv_partial, rs.kv_full, jnp.concatenate([starts, ends], 0)]
    return ins, starts.shape[0], rs.wq
  sched = tile_schedule(mask, lq_m, lk_m, block_q, block_k)
  if sched.mode != "intervals" or sched.mask_arrays[0].shape[0] > MAX_INTERVALS:
    raise ValueError(f"mosaic.{who}: unsupported mask ({unsupported_reason(dtype, d, mask, lq, lk)}).")
  starts, ends = sched.mask_arrays
  lists = ((sched.kv_order, sched.kv_tiles, sched.kv_partial, sched.kv_full, sched.wq) if rowmajor else
           (sched.q_order, sched.q_tiles, sched.q_partial, sched.q_full, sched.wk))
  ins = [jnp.asarray(a) for a in (_order(lists[0]), *lists[1:4], np.concatenate([starts, ends], 0))]
  return ins, starts.shape[0], lists[4]


def _pad_len(x, length, interpret):
  """x [B, L, ...] zero-padded along L to the tile multiple `length` for the interpreter (no bounds handling
  there), and on the GPU only to a multiple of 8 rows (the row tiling of the TMA copies): TMA reads rows past
  the end as zeros and drops stores past it, so a longer pad only costs a copy. On an H100 the text
  cross-attention (65,520 x 512) took 1.40 instead of 1.80 ms backward (benchmarks/RESULTS.md)."""
  n = _out_len(x.shape[1], length, interpret)
  return x if x.shape[1] == n else jnp.pad(x, ((0, 0), (0, n - x.shape[1])) + ((0, 0),) * (x.ndim - 2))


def _out_len(length, padded, interpret):
  """Rows of a kernel operand or output of `length` rows whose tiles span `padded`: all of them in the
  interpreter, the next multiple of 8 on the GPU (TMA drops the stores past it)."""
  return _round_up(length, 8) if interpret is None else padded


def _keep_intervals(x, idx, ivs, fill, *, per_row):
  """x where idx lies in one of the intervals ivs = [(start, end), ...], else fill. idx is the key index of
  each element; the interval vectors run along the query axis: axis 0 of x (per_row, S [q, k]) or axis 1
  (S^T [k, q] in the dk/dv kernel). Chained selects, no boolean vectors."""
  dim = [0] if per_row else [1]
  out = None
  for st, en in ivs:
    other = fill if out is None else out
    t = jnp.where(idx < lax.broadcast_in_dim(en, x.shape, dim), x, other)
    out = jnp.where(idx >= lax.broadcast_in_dim(st, x.shape, dim), t, other)
  return out


def _mask_tile(s, cols, c0, ivs, fill, *, single_run):
  """The forward's S [q, k] masked to the allowed keys of one key tile: cols is each element's key index within
  the tile (a column iota), c0 the tile's first key, ivs the rows' intervals (`_keep_intervals`). single_run
  (the schedule's `single_run`): at most one interval of a row touches any tile, so the row's keys in this tile
  are one range [lo, hi), found on the row vectors; each element then costs 2 compares and 2 selects instead of
  an add and 2 of each per interval (the forward 0.6-5.2% faster at 15,600-18,720 masked tokens on an H100)."""
  if not single_run:
    return _keep_intervals(s, cols + c0, ivs, fill, per_row=True)
  size = s.shape[1]
  lo = hi = None
  for st, en in ivs:
    a, b = jnp.maximum(st - c0, 0), jnp.minimum(en - c0, size)   # a < b iff the interval touches the tile
    lo = a if lo is None else jnp.where(a < b, a, lo)
    hi = b if hi is None else jnp.where(a < b, b, hi)
  t = jnp.where(cols < lax.broadcast_in_dim(hi, s.shape, [0]), s, fill)
  return jnp.where(cols >= lax.broadcast_in_dim(lo, s.shape, [0]), t, fill)


def _tile_list(npart_ref, nfull_ref, width, tile):
  """A tile's schedule list: (its offset in the tile lists, its partial tile count, its total tile count)."""
  n_p = npart_ref[tile]
  return tile * width, n_p, n_p + nfull_ref[tile]


def _program(order_ref, npart_ref, nfull_ref, width, tile_axis, splits=1):
  """This CTA's place: (batch, head, tile, warpgroup, offset of the tile's list, its partial and total tile
  counts). Tiles are handed out heaviest first (`order_ref`). splits > 1: `splits` consecutive CTAs share a
  tile, CTA s taking the s-th of `splits` near-equal parts of its list (partial tiles come first in a list,
  so a part's partial count is what remains of them past its start)."""
  idx = lax.axis_index(tile_axis)
  tile = order_ref[idx // splits if splits > 1 else idx]
  base, n_p, n = _tile_list(npart_ref, nfull_ref, width, tile)
  if splits > 1:
    s = lax.rem(idx, splits)
    lo, hi = n * s // splits, n * (s + 1) // splits
    base, n_p, n = base + lo, jnp.clip(n_p - lo, 0, hi - lo), hi - lo
  return lax.axis_index("batch"), lax.axis_index("heads"), tile, lax.axis_index("wg"), base, n_p, n


def _produce(plgpu, pl, n, stages, streams, offset=0):
  """The producer warpgroup's loop: for each of the n tiles of a schedule, TMA-copy every stream's tile into
  its ring slot (offset + j) % stages. streams: [(src(j) -> gmem view, smem ring [stages, ...], full barriers
  [stages], free barriers [stages] or None)]; a stream waits its free barrier (the consumers are done with the
  slot) before reusing a slot; None shares the previous stream's wait. offset: tiles the ring has carried
  before (a persistent CTA's earlier work items)."""
  def issue(j, carry):
    slot = lax.rem(offset + j, stages)
    for src, ring, full, free in streams:
      if free is not None:
        @pl.when(offset + j >= stages)
        def _():
          plgpu.barrier_wait(free.at[slot])
      plgpu.copy_gmem_to_smem(src(j), ring.at[slot], full.at[slot])
    return carry

  lax.fori_loop(0, n, issue, None)


def _pingpong(plgpu, pl, sched_bar, wg, on: bool):
  """(sync, handoff, start, end) of the two consumer warpgroups' ping-pong (all no-ops when off).
  sync: arrive and wait (after issuing a matmul); handoff(*values): the elementwise results pinned in place,
  then arrive, then wait for the other warpgroup's matmul issue; start / end: warpgroup 1's first and
  warpgroup 0's last phase, so each completes as many barrier phases as the other."""
  if not on:
    return (lambda: None), (lambda *v: v), (lambda: None), (lambda: None)

  def sync():
    plgpu.barrier_arrive(sched_bar)
    plgpu.barrier_wait(sched_bar)

  def handoff(*values):
    values = lax.optimization_barrier(values)
    sync()
    return values

  return sync, handoff, (lambda: pl.when(wg == 1)(sync)), (lambda: pl.when(wg == 0)(sync))


def _forward_items(order_ref, npart_ref, nfull_ref, width, persistent_ctas, num_heads, num_tiles, batch,
                   splits=1):
  """(count, item): this CTA's work items, item(i) -> (batch, head, tile, offset of the tile's list, partial and
  total tile counts, output batch row). One item from the grid position (splits > 1: a part of its key tiles,
  written to output row part * batch + b), or (persistent) one item of each round of N in the
  launch order (heads fastest, then query tiles heaviest first, then batch, as the grid launches them), in a
  snake: round i gives CTA c item i N + c for even i and i N + N - 1 - c for odd i, so the CTA that takes the
  heaviest item of one round takes the lightest of the next (round-robin would give CTA 0 the heaviest of
  every round)."""
  if not persistent_ctas:
    b, h, tile, _, base, n_p, n = _program(order_ref, npart_ref, nfull_ref, width, "q_seq", splits)
    out_b = b if splits == 1 else lax.rem(lax.axis_index("q_seq"), splits) * batch + b
    return 1, lambda i: (b, h, tile, base, n_p, n, out_b)
  cta, total, n_ctas = lax.axis_index("cta"), num_heads * num_tiles * batch, persistent_ctas

  def item(i):
    t = i * n_ctas + jnp.where(lax.rem(i, 2) == 0, cta, n_ctas - 1 - cta)
    h, rest = lax.rem(t, num_heads), lax.div(t, num_heads)
    tile = order_ref[lax.rem(rest, num_tiles)]
    b = lax.div(rest, num_tiles)
    return (b, h, tile, *_tile_list(npart_ref, nfull_ref, width, tile), b)

  rounds, left = divmod(total, n_ctas)   # the last round (odd: from the back) has `left` items
  in_last = cta < left if rounds % 2 == 0 else cta >= n_ctas - left
  return rounds + jnp.where(in_last, 1, 0), item


def _over_items(count, item_fn):
  """item_fn(i, g) -> g + tiles for each work item i; g counts the ring's tiles so far (a Python call for one)."""
  if isinstance(count, int) and count == 1:
    item_fn(0, 0)
  else:
    lax.fori_loop(0, count, item_fn, jnp.int32(0))


def _kernel(order_ref, tiles_ref, npart_ref, nfull_ref, iv_ref, kv_row_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
            smem, bars, free_bars, sched_bar, *, plgpu, pl, scale2, width, block_k, stages, group, n_iv,
            regs=True, persistent_ctas=0, num_tiles=0, single_run=False, splits=1):
  """One CTA: 2 consumer warpgroups x 64 query rows, 1 producer warpgroup (see module docstring); one work item
  (head, query tile, batch), or several in turn (persistent_ctas, `_forward_items`).

  regs=False is the CPU-interpreter variant: no register reallocation, and P V goes to a fresh
  accumulator that is then added (the interpreter lacks those two primitives); barriers, copies, the
  schedule walk and the masking are the same code."""
  qo_smem2, k_smem, v_smem, lse_smem2, iv_smem2, *p_smem2 = smem
  k_bars, v_bars, q_bars, iv_bars = bars
  k_free, v_free = free_bars
  bq, d = ROWS_PER_WG, q_ref.shape[-1]
  dtype = q_ref.dtype
  wg = lax.axis_index("wg")
  count, item = _forward_items(order_ref, npart_ref, nfull_ref, width, persistent_ctas, q_ref.shape[2], num_tiles,
                               q_ref.shape[0], splits)

  sched_sync, _, start, end = _pingpong(plgpu, pl, sched_bar, wg, True)

  @pl.when(wg < COMPUTE_WGS)
  def _consumer():
    if regs:  # (the CPU interpreter has no register file)
      plgpu.set_max_registers(232, action="increase")
    qo_smem = qo_smem2.at[wg]
    lse_smem = lse_smem2.at[wg]

    def one_item(i, g):
      b, h, qi, base, n_p, n, out_b = item(i)
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
        plgpu.barrier_wait(k_bars.at[lax.rem(g, stages)])

      start()

      def step(j, carry, masked):
        acc, m, l = carry
        slot = lax.rem(g + j, stages)

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
          sched_sync()
          return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((bq, block_k), jnp.float32))  # [64, bk] raw logits
        plgpu.barrier_arrive(k_free.at[slot])
        if masked:
          cols = plgpu.broadcasted_iota(jnp.int32, (bq, block_k), 1, layout=plgpu.Layout.WGMMA)
          s = _mask_tile(s, cols, tiles_ref[base + j] * block_k, ivs, -jnp.inf, single_run=single_run)
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
            plgpu.barrier_wait(k_bars.at[lax.rem(g + nxt, stages)])

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
      end()

      l_safe = jnp.maximum(l, 1e-30)  # l == 0 only on fully masked rows, whose acc is 0 too
      acc = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
      qo_smem[...] = acc.astype(dtype)
      lse_smem[...] = jnp.where(l > 0.0, m + jnp.log(l_safe) * LOG2E, BIG)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[out_b, pl.ds(q0, bq), h])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[out_b, h, pl.ds(q0, bq)])
      plgpu.wait_smem_to_gmem(0)   # (also: the next item's Q load may overwrite qo_smem)
      return g + n

    _over_items(count, one_item)

  @pl.when(wg == COMPUTE_WGS)
  def _producer():
    if regs:
      plgpu.set_max_registers(40, action="decrease")

    def one_item(i, g):
      b, h, _, base, _, n, _ = item(i)
      kv_head = lax.div(h, jnp.array(group, h.dtype))
      kv_b = b + kv_row_ref[0]   # k/v row of this batch entry: b, or index * B into a stack (`forward(kv_index=)`)
      rows = lambda j: (kv_b, pl.ds(tiles_ref[base + j] * block_k, block_k), kv_head)
      _produce(plgpu, pl, n, stages, [(lambda j: k_ref.at[rows(j)], k_smem, k_bars, k_free),
                                      (lambda j: v_ref.at[rows(j)], v_smem, v_bars, v_free)], offset=g)
      return g + n

    _over_items(count, one_item)


def forward(q, k, v, mask: Mask, *, sm_scale: float, cfg: MosaicConfig = MosaicConfig(), interpret=None,
            kv_index=None, unpadded_o=False):
  """q [B, Lq, H, D], k/v [B, Lk, Hkv, D] (any Lq, Lk; `_pad_len`) -> (o [B, Lq, H, D],
  lse2 [B, H, Lq] f32). `mask` has shape (Lq, Lk) or smaller (padded rows/keys beyond it allow nothing).
  unpadded_o: o written with Lq rows (`_out_len`) instead of the tile multiple and a slice (a copy). The callers
  outside autodiff pass True (`flash_attention`'s plain forward, `flash_attention_stacked`). Differentiated
  calls keep the padded o: with it unpadded, the compiled TF training step ran this kernel a second time per
  layer in its backward pass (3385 instead of 3025 ms on an H100). The lowered StableHLO holds one call per
  attention either way (jax 0.11.2 and 0.12), so an XLA pass made the copy; which one was not found.
  interpret: passed to `plgpu.kernel` (jax >= 0.12 has a Mosaic GPU interpreter that runs on the CPU:
  barriers, TMA copies and wgmma emulated; the kernel logic test uses it).
  kv_index (an int32 scalar, may be traced): k/v are stacks [N, B, Lk, Hkv, D] and the kernel reads entry
  kv_index in place (a streaming KV cache of all layers: no per-layer slice is copied). Lk must then be a
  multiple of cfg.block_k (padding would copy the whole stack)."""
  import jax.experimental.pallas as pl  # noqa: PLC0415  (Mosaic GPU imports only where used)
  import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415

  b, lq, h, d = q.shape
  if kv_index is None:
    kv_row = jnp.zeros((1,), jnp.int32)
  else:
    if k.ndim != 5 or v.shape != k.shape or k.shape[1] != b or k.shape[2] % cfg.block_k:
      raise ValueError(f"mosaic.forward(kv_index=): k/v must be stacks [N, B={b}, Lk, Hkv, D] with Lk a multiple "
                       f"of block_k={cfg.block_k}, got k {k.shape} and v {v.shape}.")
    kv_row = jnp.reshape(jnp.asarray(kv_index, jnp.int32) * b, (1,))
    k, v = (x.reshape((-1,) + x.shape[2:]) for x in (k, v))   # [N * B, Lk, Hkv, D]: a free reshape
  lk, hkv = k.shape[1], k.shape[2]
  lq_m, lk_m = _round_up(lq, cfg.block_q), _round_up(lk, cfg.block_k)
  ins, n_iv, width = _schedule_inputs("forward", q.dtype, d, mask, lq, lk, lq_m, lk_m, cfg.block_q, cfg.block_k,
                                     rowmajor=True)
  # the static row schedule (cached; None for a run-time mask) decides the masking and the launch
  static = None if isinstance(mask, KeyIntervals) else tile_schedule(mask, lq_m, lk_m, cfg.block_q, cfg.block_k)
  single_run = SINGLE_RUN and static is not None and static.single_run
  qp, kp, vp = (_pad_len(x, n, interpret) for x, n in ((q, lq_m), (k, lk_m), (v, lk_m)))
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
  num_tiles = lq_m // cfg.block_q
  kernel = functools.partial(_kernel, plgpu=plgpu, pl=pl, scale2=sm_scale * LOG2E, width=width,
                             block_k=cfg.block_k, stages=stages, group=h // hkv, n_iv=n_iv,
                             regs=interpret is None, num_tiles=num_tiles, single_run=single_run)
  persistent_ctas = _persistent_ctas(cfg, static)
  splits = _kv_splits(cfg, static, h * num_tiles * b, persistent_ctas)
  if persistent_ctas and splits > 1:
    raise ValueError(f"MosaicConfig: persistent_ctas={persistent_ctas} and kv_splits={splits} do not go together; "
                     "set one of them to 0 / 1 (or None).")
  if persistent_ctas:
    grid, names = (min(persistent_ctas, h * num_tiles * b),), ("cta",)
    kernel = functools.partial(kernel, persistent_ctas=grid[0])
  else:
    grid, names = (h, num_tiles * splits, b), ("heads", "q_seq", "batch")
    kernel = functools.partial(kernel, splits=splits)
  o, lse = plgpu.kernel(
      kernel,
      out_type=[jax.ShapeDtypeStruct((splits * b, _out_len(lq, lq_m, interpret) if unpadded_o else lq_m, h, d),
                                     q.dtype),
                jax.ShapeDtypeStruct((splits * b, h, lq_m), jnp.float32)],
      scratch_types=scratch,
      grid=grid,
      grid_names=names,
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      **({} if interpret is None else dict(interpret=interpret)),
  )(*ins, kv_row, qp, kp, vp)
  if splits > 1:
    o, lse = _combine_parts(o, lse, splits)
    o = o.astype(q.dtype)
  return o[:, :lq], lse[:, :, :lq]


# ---------------------------------------------------------------------------------------------------
# Backward: dq and dk/dv, two kernels (FlashAttention-2's split: no atomics, each output written once).
# Both have the forward's shape: 2 consumer warpgroups x 64 rows and a producer warpgroup that walks a tile
# schedule into a shared-memory ring. p = exp2(s * scale2 - lse2) from the forward's lse2 (BIG on rows with
# nothing allowed and on padded rows, so p = 0 there); delta = rowsum(dO * O) comes from XLA.
#   dq kernel, one CTA per (q head, 128 query rows, batch), over the row schedule's key tiles:
#     S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K.
#   dk/dv kernel, one CTA per (q head, 128 key rows, batch), over the column schedule's query tiles, in
#   the transposed orientation so P^T and dS^T are wgmma A operands straight from registers:
#     S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q.
# Grouped heads: dk/dv per q head (bf16), summed over the group in fp32 outside.
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MosaicBwdConfig:
  """dq_block_k: the dq kernel's key tile; dkdv_block_q: the dk/dv kernel's query tile (multiples of 64);
  stages: ring depths of the two kernels. pingpong: the forward's schedule for the two consumer warpgroups
  (one's elementwise work under the other's matmuls: a shared barrier pairs each one's matmul issue with the
  other's elementwise end, warpgroup 1 starting one phase late); off until a GPU run shows it faster.
  dkdv_splits: CTAs that share one key tile of the dk/dv kernel, each walking a part of its query tiles into
  partial dk, dv (fp32, summed after the kernel); None: `auto_dkdv_splits`, which splits only where
  there are fewer than 4 CTAs per SM (few keys, many queries: the text cross-attention has 4 key tiles a head
  against 512 query tiles).
  fused_dq: no dq kernel; the dk/dv kernel also forms dQ += dS K per tile and TMA-adds it into an fp32
  accumulator (5 matmuls a tile instead of the two kernels' 7; dq_* fields then unused). Off: as written it
  is 22-33% slower on an H100 (each tile's dQ product and store stall the consumers; RESULTS.md). A version
  with FlashAttention-3's split (dS shared through shared memory, each warpgroup forming half of dQ's columns
  over all the CTA's keys: half the TMA-added bytes) was slower still, 28-40% over the default (RESULTS.md, run 6)."""
  dq_block_k: int = 128
  dq_stages: int = 2
  dkdv_block_q: int = 64
  dkdv_stages: int = 2
  pingpong: bool = False
  dkdv_splits: int | None = None
  fused_dq: bool = False


def auto_dkdv_splits(ctas: int, width: int) -> int:
  """Splits of the dk/dv kernel's query walk for `ctas` CTAs whose longest list has `width` query tiles:
  enough for 4 CTAs per SM, each part keeping at least 8 tiles (its fixed costs: the K/V load and the
  dk/dv store). On the H100 the text cross-attention's backward (65,520 x 512, 48 CTAs unsplit) took 2.97 ms
  unsplit, 1.92 ms in 6 parts and 1.81 ms in 12 (benchmarks/RESULTS.md)."""
  if ctas >= 4 * SMS:
    return 1
  return max(1, min(-(-4 * SMS // ctas), width // 8))


def _mma_into(acc, a, b_smem, a_smem, *, plgpu, pl, regs):
  """acc + a @ b_smem by wgmma, a [M, K] in registers. regs=False (CPU interpreter: no register A operand,
  no run_state): a goes through the shared-memory scratch a_smem into a fresh accumulator."""
  if regs:
    return pl.run_state(lambda r: plgpu.wgmma(r, a, b_smem))(plgpu.ACC.init(acc))
  a_smem[...] = a
  plgpu.commit_smem()
  return acc + pl.run_scoped(lambda r: (plgpu.wgmma(r, a_smem, b_smem), r[...])[1], plgpu.ACC(acc.shape, jnp.float32))


def _mma(a_smem, b_smem, shape, *, plgpu, pl):
  """a_smem @ b_smem by wgmma into a fresh fp32 accumulator of `shape`."""
  return pl.run_scoped(lambda r: (plgpu.wgmma(r, a_smem, b_smem), r[...])[1], plgpu.ACC(shape, jnp.float32))


def _dq_kernel(order_ref, tiles_ref, npart_ref, nfull_ref, iv_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               dq_ref, smem, bars, free_bars, sched_bar, *, plgpu, pl, scale, scale2, width, block_k, stages, group,
               n_iv, regs, pingpong):
  q_smem2, do_smem2, lse_smem2, delta_smem2, iv_smem2, k_smem, v_smem, *ds_smem2 = smem
  k_bars, v_bars, in_bars = bars  # in_bars [5 * COMPUTE_WGS]: q, do, lse, delta, iv per consumer
  k_free, v_free = free_bars
  bq = ROWS_PER_WG
  dtype = q_ref.dtype
  b, h, qi, wg, base, n_p, n = _program(order_ref, npart_ref, nfull_ref, width, "q_seq")
  mm = dict(plgpu=plgpu, pl=pl)
  sync, handoff, start, end = _pingpong(plgpu, pl, sched_bar, wg, pingpong)

  @pl.when(wg < COMPUTE_WGS)
  def _consumer():
    if regs:
      plgpu.set_max_registers(232, action="increase")
    q0 = qi * (COMPUTE_WGS * bq) + wg * bq
    q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
    rows = (b, pl.ds(q0, bq), h)
    ins = [(q_ref.at[rows], q_smem), (do_ref.at[rows], do_smem), (lse_ref.at[b, h, pl.ds(q0, bq)], lse_smem2.at[wg]),
           (delta_ref.at[b, h, pl.ds(q0, bq)], delta_smem2.at[wg]), (iv_ref.at[:, pl.ds(q0, bq)], iv_smem2.at[wg])]
    for i, (src, dst) in enumerate(ins):
      plgpu.copy_gmem_to_smem(src, dst, in_bars.at[i * COMPUTE_WGS + wg])
    for i in range(len(ins)):
      plgpu.barrier_wait(in_bars.at[i * COMPUTE_WGS + wg])
    row = plgpu.Layout.WGMMA.reduce(1)
    lse = plgpu.load(lse_smem2.at[wg], layout=row)
    delta = plgpu.load(delta_smem2.at[wg], layout=row)
    ivs = [(plgpu.load(iv_smem2.at[wg, r], layout=row), plgpu.load(iv_smem2.at[wg, n_iv + r], layout=row))
           for r in range(n_iv)]
    dq = plgpu.layout_cast(jnp.zeros((bq, q_ref.shape[-1]), jnp.float32), plgpu.Layout.WGMMA)
    start()

    def step(j, dq, masked):
      slot = lax.rem(j, stages)
      plgpu.barrier_wait(k_bars.at[slot])
      plgpu.barrier_wait(v_bars.at[slot])

      def s_dp(s_ref, dp_ref):
        plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
        plgpu.wgmma(dp_ref, do_smem, v_smem.at[slot].transpose((1, 0)))
        sync()
        return s_ref[...], dp_ref[...]

      s, dp = pl.run_scoped(s_dp, plgpu.ACC((bq, block_k), jnp.float32), plgpu.ACC((bq, block_k), jnp.float32))
      plgpu.barrier_arrive(v_free.at[slot])
      p = jnp.exp2(s * scale2 - lax.broadcast_in_dim(lse, s.shape, [0]))
      if masked:
        cols = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
        p = _keep_intervals(p, cols + tiles_ref[base + j] * block_k, ivs, 0.0, per_row=True)
      ds = (p * (dp - lax.broadcast_in_dim(delta, s.shape, [0]))).astype(dtype)
      dq, ds = handoff(dq, ds)
      dq = _mma_into(dq, ds, k_smem.at[slot], ds_smem2[0].at[wg] if ds_smem2 else None, regs=regs, **mm)
      plgpu.barrier_arrive(k_free.at[slot])
      return dq

    dq = lax.fori_loop(0, n_p, functools.partial(step, masked=True), dq)
    dq = lax.fori_loop(n_p, n, functools.partial(step, masked=False), dq)
    end()
    q_smem[...] = (dq * scale).astype(dtype)  # the last wgmma reading q_smem has completed
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == COMPUTE_WGS)
  def _producer():
    if regs:
      plgpu.set_max_registers(40, action="decrease")
    kv_head = lax.div(h, jnp.array(group, h.dtype))
    rows = lambda j: (b, pl.ds(tiles_ref[base + j] * block_k, block_k), kv_head)
    _produce(plgpu, pl, n, stages, [(lambda j: k_ref.at[rows(j)], k_smem, k_bars, k_free),
                                    (lambda j: v_ref.at[rows(j)], v_smem, v_bars, v_free)])


def _dkdv_kernel(order_ref, tiles_ref, npart_ref, nfull_ref, iv_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                 *refs, plgpu, pl, scale, scale2, width, block_q, stages, group, n_iv, regs, pingpong, splits,
                 fused_dq):
  # fused_dq: dq_ref is the fp32 dQ accumulator (a Ref the kernel adds into), ds_smem2 the dS^T staging.
  # stage2 (fused_dq or splits > 1): an fp32 [COMPUTE_WGS, 64, D] staging tile for dQ products and fp32 dk/dv.
  dq_ref = refs[0] if fused_dq else None
  dk_ref, dv_ref, smem, bars, free_bars, sched_bar, *extra = refs[1:] if fused_dq else refs
  ds_smem2 = extra[0][0] if fused_dq else None
  stage2 = extra[0][-1] if extra else None
  k_smem2, v_smem2, q_ring, do_ring, lse_ring, delta_ring, iv_ring, *a_smem2 = smem
  kv_bars, ring_bars = bars  # kv_bars [2 * COMPUTE_WGS]: k, v per consumer; ring_bars: q, do, lse, delta, iv
  (free,) = free_bars
  bk = ROWS_PER_WG
  dtype = q_ref.dtype
  b, h, ki, wg, base, n_p, n = _program(order_ref, npart_ref, nfull_ref, width, "k_seq", splits)
  mm = dict(plgpu=plgpu, pl=pl)
  sync, handoff, start, end = _pingpong(plgpu, pl, sched_bar, wg, pingpong)

  @pl.when(wg < COMPUTE_WGS)
  def _consumer():
    if regs:
      plgpu.set_max_registers(232, action="increase")
    k0 = ki * (COMPUTE_WGS * bk) + wg * bk
    k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
    kv_head = lax.div(h, jnp.array(group, h.dtype))
    kv_rows = (b, pl.ds(k0, bk), kv_head)
    plgpu.copy_gmem_to_smem(k_ref.at[kv_rows], k_smem, kv_bars.at[wg])
    plgpu.copy_gmem_to_smem(v_ref.at[kv_rows], v_smem, kv_bars.at[COMPUTE_WGS + wg])
    plgpu.barrier_wait(kv_bars.at[wg])
    plgpu.barrier_wait(kv_bars.at[COMPUTE_WGS + wg])
    col = plgpu.Layout.WGMMA.reduce(0)
    d = q_ref.shape[-1]
    zeros = plgpu.layout_cast(jnp.zeros((bk, d), jnp.float32), plgpu.Layout.WGMMA)
    a_smem = a_smem2[0].at[wg] if a_smem2 else None
    start()

    def add_dq(j, dst):
      """dQ += dS K for this step's query tile (FlashAttention-3's single-kernel backward): dS^T to shared
      memory, read back transposed as the wgmma A operand; the [block_q, D] fp32 product is TMA-added into
      dq_ref. The interpreter has no TMA reduction: there each (CTA, warpgroup) stores its products into its
      own block of dq_ref (it visits a query tile once), summed after the kernel."""
      ds_smem, stage = ds_smem2.at[wg], stage2.at[wg]
      ds_smem[...] = dst.astype(dtype)
      plgpu.commit_smem()
      part = _mma(ds_smem.transpose((1, 0)), k_smem, (block_q, d), **mm)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the previous step's add has read `stage`
      stage[...] = part
      plgpu.commit_smem()
      q_rows = pl.ds(tiles_ref[base + j] * block_q, block_q)
      if regs:
        plgpu.copy_smem_to_gmem(stage, dq_ref.at[b, q_rows, h], reduction_op="add")
      else:
        nb = dk_ref.shape[0] // splits
        owner = (lax.axis_index("k_seq") * COMPUTE_WGS + wg) * nb + b
        plgpu.copy_smem_to_gmem(stage, dq_ref.at[owner, q_rows, h])

    def step(j, carry, masked):
      dk, dv = carry
      slot = lax.rem(j, stages)
      for bar in ring_bars:  # every barrier every step: the wait parity is tracked per barrier
        plgpu.barrier_wait(bar.at[slot])
      def s_t(r):  # S^T [64 keys, bq]
        plgpu.wgmma(r, k_smem, q_ring.at[slot].transpose((1, 0)))
        sync()
        return r[...]

      st = pl.run_scoped(s_t, plgpu.ACC((bk, block_q), jnp.float32))
      lse = plgpu.load(lse_ring.at[slot], layout=col)
      pt = jnp.exp2(st * scale2 - lax.broadcast_in_dim(lse, st.shape, [1]))
      if masked:
        keys = plgpu.broadcasted_iota(jnp.int32, st.shape, 0, layout=plgpu.Layout.WGMMA) + k0
        ivs = [(plgpu.load(iv_ring.at[slot, r], layout=col), plgpu.load(iv_ring.at[slot, n_iv + r], layout=col))
               for r in range(n_iv)]
        pt = _keep_intervals(pt, keys, ivs, 0.0, per_row=False)
      dk, dv, pt = handoff(dk, dv, pt)
      if regs:  # dV += P^T dO and dP^T = V dO^T in one region: one wgmma wait for both
        def dv_dpt(refs):
          plgpu.wgmma(refs[0], pt.astype(dtype), do_ring.at[slot])
          plgpu.wgmma(refs[1], v_smem, do_ring.at[slot].transpose((1, 0)))
        zero = plgpu.layout_cast(jnp.zeros(st.shape, jnp.float32), plgpu.Layout.WGMMA)
        dv, dpt = pl.run_state(dv_dpt)((plgpu.ACC.init(dv), plgpu.ACC.init(zero)))
      else:
        dv = _mma_into(dv, pt.astype(dtype), do_ring.at[slot], a_smem, regs=regs, **mm)
        dpt = _mma(v_smem, do_ring.at[slot].transpose((1, 0)), (bk, block_q), **mm)
      delta = plgpu.load(delta_ring.at[slot], layout=col)
      dst = pt * (dpt - lax.broadcast_in_dim(delta, st.shape, [1]))
      dk = _mma_into(dk, dst.astype(dtype), q_ring.at[slot], a_smem, regs=regs, **mm)
      if fused_dq:
        add_dq(j, dst)
      plgpu.barrier_arrive(free.at[slot])
      return dk, dv

    carry = lax.fori_loop(0, n_p, functools.partial(step, masked=True), (zeros, zeros))
    dk, dv = lax.fori_loop(n_p, n, functools.partial(step, masked=False), carry)
    end()
    part = lax.rem(lax.axis_index("k_seq"), splits) * (dk_ref.shape[0] // splits)   # this split's batch block
    out_rows = (part + b, pl.ds(k0, bk), h)
    if splits > 1:   # fp32 partials, summed after the kernel: one staging tile, dk then dv
      stage = stage2.at[wg]
      for val, ref in ((dk * scale, dk_ref), (dv, dv_ref)):
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        stage[...] = val
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(stage, ref.at[out_rows])
    else:
      k_smem[...] = (dk * scale).astype(dtype)
      v_smem[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[out_rows])
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[out_rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == COMPUTE_WGS)
  def _producer():
    if regs:
      plgpu.set_max_registers(40, action="decrease")
    q0 = lambda j: tiles_ref[base + j] * block_q
    rows = lambda j: (b, pl.ds(q0(j), block_q), h)
    q_bars, do_bars, lse_bars, delta_bars, iv_bars = bars[1]
    _produce(plgpu, pl, n, stages, [
        (lambda j: q_ref.at[rows(j)], q_ring, q_bars, free),
        (lambda j: do_ref.at[rows(j)], do_ring, do_bars, None),
        (lambda j: lse_ref.at[b, h, pl.ds(q0(j), block_q)], lse_ring, lse_bars, None),
        (lambda j: delta_ref.at[b, h, pl.ds(q0(j), block_q)], delta_ring, delta_bars, None),
        (lambda j: iv_ref.at[:, pl.ds(q0(j), block_q)], iv_ring, iv_bars, None)])


def backward(q, k, v, o, lse, do, mask: Mask, *, sm_scale: float, cfg: MosaicBwdConfig = MosaicBwdConfig(),
             interpret=None):
  """q, o, do [B, Lq, H, D]; k, v [B, Lk, Hkv, D]; lse2 [B, H, >= Lq] from a forward kernel -> (dq, dk, dv)
  in the inputs' dtype. Any Lq, Lk (`_pad_len`; rows past Lq get lse2 = BIG and zero dO, so they add nothing).
  `unsupported_reason` decides which calls it takes (the same rules as the forward)."""
  import jax.experimental.pallas as pl  # noqa: PLC0415
  import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415

  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  block = COMPUTE_WGS * ROWS_PER_WG  # 128: the query rows of a dq CTA and the key rows of a dk/dv CTA
  lq_m = _round_up(lq, max(block, cfg.dkdv_block_q))
  lk_m = _round_up(lk, max(block, cfg.dq_block_k))
  sched = functools.partial(_schedule_inputs, "backward", q.dtype, d, mask, lq, lk, lq_m, lk_m)
  kv_ins, kv_iv, kv_width = sched(cfg.dkdv_block_q, block, rowmajor=False)
  delta = jnp.pad(softmax_delta(o, do), ((0, 0), (0, 0), (0, lq_m - lq)))
  lse = jnp.pad(lse[:, :, :lq], ((0, 0), (0, 0), (0, lq_m - lq)), constant_values=BIG)
  qp, dop, kp, vp = (_pad_len(x, n, interpret)
                    for x, n in ((q, lq_m), (do.astype(q.dtype), lq_m), (k, lk_m), (v, lk_m)))
  group = h // hkv
  regs = interpret is None
  smem_tf = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  tile = lambda *shape: plgpu.SMEM(shape, q.dtype, transforms=smem_tf)
  common = dict(plgpu=plgpu, pl=pl, scale=sm_scale, scale2=sm_scale * LOG2E, group=group, regs=regs,
                pingpong=cfg.pingpong)
  launch = dict(num_threads=COMPUTE_WGS + 1, thread_name="wg",
                compiler_params=plgpu.CompilerParams(approx_math=True),
                **({} if interpret is None else dict(interpret=interpret)))

  if cfg.fused_dq and cfg.pingpong:
    raise ValueError("MosaicBwdConfig: fused_dq and pingpong do not go together; set one of them False.")
  if not cfg.fused_dq:   # dq (fused_dq: formed in the dk/dv kernel below)
    dq_ins, n_iv, dq_width = sched(block, cfg.dq_block_k, rowmajor=True)
    bk, st = cfg.dq_block_k, cfg.dq_stages
    scratch = [
        (tile(COMPUTE_WGS, ROWS_PER_WG, d), tile(COMPUTE_WGS, ROWS_PER_WG, d),
         plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG), jnp.float32), plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG), jnp.float32),
         plgpu.SMEM((COMPUTE_WGS, 2 * n_iv, ROWS_PER_WG), jnp.int32), tile(st, bk, d), tile(st, bk, d))
        + (() if regs else (plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG, bk), q.dtype),)),
        (plgpu.Barrier(num_barriers=st), plgpu.Barrier(num_barriers=st),
         plgpu.Barrier(num_barriers=5 * COMPUTE_WGS)),
        (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=st),) * 2,
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),   # the ping-pong's (unused when off)
    ]
    dq = plgpu.kernel(
        functools.partial(_dq_kernel, width=dq_width, block_k=bk, stages=st, n_iv=n_iv, **common),
        out_type=jax.ShapeDtypeStruct((b, _out_len(lq, lq_m, interpret), h, d), q.dtype), scratch_types=scratch,
        grid=(h, lq_m // block, b), grid_names=("heads", "q_seq", "batch"), **launch,
    )(*dq_ins, qp, kp, vp, dop, lse, delta)

  # dk, dv (per q head)
  n_iv, bq, st = kv_iv, cfg.dkdv_block_q, cfg.dkdv_stages
  scratch = [
      (tile(COMPUTE_WGS, ROWS_PER_WG, d), tile(COMPUTE_WGS, ROWS_PER_WG, d), tile(st, bq, d), tile(st, bq, d),
       plgpu.SMEM((st, bq), jnp.float32), plgpu.SMEM((st, bq), jnp.float32), plgpu.SMEM((st, 2 * n_iv, bq), jnp.int32))
      + (() if regs else (plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG, bq), q.dtype),)),
      (plgpu.Barrier(num_barriers=2 * COMPUTE_WGS), (plgpu.Barrier(num_barriers=st),) * 5),
      (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=st),),
      plgpu.Barrier(num_arrivals=COMPUTE_WGS),
  ]
  splits = cfg.dkdv_splits or auto_dkdv_splits(h * b * (lk_m // block), kv_width)
  programs = lk_m // block * splits
  extra = ()
  # the fp32 staging tile of the dQ products (fused_dq) or of the partial dk, dv (splits > 1)
  stage = lambda: plgpu.SMEM((COMPUTE_WGS, bq, d), jnp.float32,
                             transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)))
  if cfg.fused_dq:
    scratch.append((tile(COMPUTE_WGS, ROWS_PER_WG, bq), stage()))
    # interpreter: one block per (program, warpgroup, batch), summed below (no TMA reduction there)
    acc_rows = b if regs else programs * COMPUTE_WGS * b
    extra = (jax.new_ref(jnp.zeros((acc_rows, lq_m, h, d), jnp.float32)),)
  elif splits > 1:
    scratch.append((stage(),))
  dk, dv = plgpu.kernel(
      functools.partial(_dkdv_kernel, width=kv_width, block_q=bq, stages=st, n_iv=n_iv, splits=splits,
                        fused_dq=cfg.fused_dq, **common),
      out_type=[jax.ShapeDtypeStruct((splits * b, _out_len(lk, lk_m, interpret), h, d),
                                     jnp.float32 if splits > 1 else q.dtype)] * 2,
      scratch_types=scratch,
      grid=(h, programs, b), grid_names=("heads", "k_seq", "batch"), **launch,
  )(*kv_ins, qp, kp, vp, dop, lse, delta, *extra)
  if cfg.fused_dq:
    acc = extra[0][...].reshape(-1, b, lq_m, h, d).sum(0)
    dq = (acc * sm_scale).astype(q.dtype)
  if splits > 1 or group > 1:   # the split parts and the query heads of a k/v head, summed in fp32
    dk, dv = (x.reshape(splits, b, x.shape[1], hkv, group, d).astype(jnp.float32).sum((0, 4)).astype(q.dtype)
              for x in (dk, dv))
  return dq[:, :lq], dk[:, :lk], dv[:, :lk]


# ---------------------------------------------------------------------------------------------------
# Fused forward + JVP (the online-softmax form of `kernels.forward_jvp`; math in
# ../shared/reference/pallas_gpu.md). The forward kernel's shape, with the tangent tiles tK, tV streamed
# beside K, V and tQ beside Q; per key tile, by wgmma:
#   S = Q K^T and dS = tQ K^T + Q tK^T (one wait);  P~ = exp2(S scale2 - m);  l <- a l + sum P~;
#   r <- a r + sum(P~ dS scale);  O~ <- a O~ + P~ V;  G <- a G + P~ tV + (P~ dS scale) V (one wait);
#   O = O~ / l,  tO = G / l - (r / l) O.
# Tangents that are symbolic zeros (None) are left out at trace time.
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MosaicJvpConfig:
  """block_k: key tile (a multiple of 64); stages: ring depth of the K, V, tK, tV tiles."""
  block_k: int = 64
  stages: int = 2


def _jvp_kernel(order_ref, tiles_ref, npart_ref, nfull_ref, iv_ref, q_ref, k_ref, v_ref, tq_ref, tk_ref, tv_ref,
                o_ref, to_ref, smem, bars, free_bars, *, plgpu, pl, scale, scale2, width, block_k, stages, group, n_iv,
                regs, has_tq, has_tk, has_tv):
  q_smem2, tq_smem2, iv_smem2, k_ring, v_ring, tk_ring, tv_ring, *a_smem2 = smem
  k_bars, v_bars, tk_bars, tv_bars, in_bars = bars  # in_bars [3 * COMPUTE_WGS]: q, tq, iv per consumer
  (free,) = free_bars
  bq = ROWS_PER_WG
  dtype = q_ref.dtype
  b, h, qi, wg, base, n_p, n = _program(order_ref, npart_ref, nfull_ref, width, "q_seq")
  mm = dict(plgpu=plgpu, pl=pl)
  ring_bars = [k_bars, v_bars] + ([tk_bars] if has_tk else []) + ([tv_bars] if has_tv else [])

  @pl.when(wg < COMPUTE_WGS)
  def _consumer():
    if regs:
      plgpu.set_max_registers(232, action="increase")
    q0 = qi * (COMPUTE_WGS * bq) + wg * bq
    q_smem, tq_smem = q_smem2.at[wg], tq_smem2.at[wg]
    rows = (b, pl.ds(q0, bq), h)
    ins = [(q_ref.at[rows], q_smem, 0), (iv_ref.at[:, pl.ds(q0, bq)], iv_smem2.at[wg], 2)]
    ins += [(tq_ref.at[rows], tq_smem, 1)] if has_tq else []
    for src, dst, i in ins:
      plgpu.copy_gmem_to_smem(src, dst, in_bars.at[i * COMPUTE_WGS + wg])
    for _, _, i in ins:
      plgpu.barrier_wait(in_bars.at[i * COMPUTE_WGS + wg])
    row = plgpu.Layout.WGMMA.reduce(1)
    ivs = [(plgpu.load(iv_smem2.at[wg, r], layout=row), plgpu.load(iv_smem2.at[wg, n_iv + r], layout=row))
           for r in range(n_iv)]
    d = q_ref.shape[-1]
    zeros = plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), plgpu.Layout.WGMMA)
    m = plgpu.layout_cast(jnp.full((bq,), MASK_VALUE, jnp.float32), row)
    zrow = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), row)
    a_smem = a_smem2[0].at[wg] if a_smem2 else None
    has_ds = has_tq or has_tk

    def step(j, carry, masked):
      acc, gacc, m, l, r = carry
      slot = lax.rem(j, stages)
      for bar in ring_bars:  # every barrier every step (per-barrier wait parity)
        plgpu.barrier_wait(bar.at[slot])
      kt = k_ring.at[slot].transpose((1, 0))

      def logits(s_ref, ds_ref=None):
        plgpu.wgmma(s_ref, q_smem, kt)
        if has_tq:
          plgpu.wgmma(ds_ref, tq_smem, kt)
        if has_tk:
          plgpu.wgmma(ds_ref, q_smem, tk_ring.at[slot].transpose((1, 0)))
        return s_ref[...], (ds_ref[...] if has_ds else None)

      acc_shape = plgpu.ACC((bq, block_k), jnp.float32)
      s, ds = pl.run_scoped(logits, *([acc_shape] * (2 if has_ds else 1)))
      if masked:
        cols = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
        s = _keep_intervals(s, cols + tiles_ref[base + j] * block_k, ivs, -jnp.inf, per_row=True)
      m_new = jnp.maximum(m, s.max(axis=1) * scale2)
      alpha = jnp.exp2(m - m_new)
      p = jnp.exp2(s * scale2 - lax.broadcast_in_dim(m_new, s.shape, [0]))
      l = l * alpha + p.sum(axis=1)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      gacc = gacc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      p16 = p.astype(dtype)
      pds16 = None
      if has_ds:
        pds = p * (ds * scale)
        r = r * alpha + pds.sum(axis=1)
        pds16 = pds.astype(dtype)
      if regs:
        def pv(refs):
          acc_ref, g_ref = refs
          plgpu.wgmma(acc_ref, p16, v_ring.at[slot])
          if has_tv:
            plgpu.wgmma(g_ref, p16, tv_ring.at[slot])
          if has_ds:
            plgpu.wgmma(g_ref, pds16, v_ring.at[slot])
        acc, gacc = pl.run_state(pv)((plgpu.ACC.init(acc), plgpu.ACC.init(gacc)))
      else:  # CPU interpreter: A operands through shared memory (see `_mma_into`)
        acc = _mma_into(acc, p16, v_ring.at[slot], a_smem, regs=False, **mm)
        if has_tv:
          gacc = _mma_into(gacc, p16, tv_ring.at[slot], a_smem, regs=False, **mm)
        if has_ds:
          gacc = _mma_into(gacc, pds16, v_ring.at[slot], a_smem, regs=False, **mm)
      plgpu.barrier_arrive(free.at[slot])
      return acc, gacc, m_new, l, r

    carry = lax.fori_loop(0, n_p, functools.partial(step, masked=True), (zeros, zeros, m, zrow, zrow))
    acc, gacc, m, l, r = lax.fori_loop(n_p, n, functools.partial(step, masked=False), carry)
    inv = jnp.where(l > 0.0, 1.0 / jnp.maximum(l, 1e-30), 0.0)  # l == 0: a row with nothing allowed
    o = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
    to = gacc * lax.broadcast_in_dim(inv, acc.shape, [0]) - o * lax.broadcast_in_dim(r * inv, acc.shape, [0])
    q_smem[...] = o.astype(dtype)  # the last wgmma reading q_smem / tq_smem has completed
    tq_smem[...] = to.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, o_ref.at[rows])
    plgpu.copy_smem_to_gmem(tq_smem, to_ref.at[rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == COMPUTE_WGS)
  def _producer():
    if regs:
      plgpu.set_max_registers(40, action="decrease")
    kv_head = lax.div(h, jnp.array(group, h.dtype))
    rows = lambda j: (b, pl.ds(tiles_ref[base + j] * block_k, block_k), kv_head)
    streams = [(lambda j: k_ref.at[rows(j)], k_ring, k_bars, free), (lambda j: v_ref.at[rows(j)], v_ring, v_bars, None)]
    streams += [(lambda j: tk_ref.at[rows(j)], tk_ring, tk_bars, None)] if has_tk else []
    streams += [(lambda j: tv_ref.at[rows(j)], tv_ring, tv_bars, None)] if has_tv else []
    _produce(plgpu, pl, n, stages, streams)


def forward_jvp(q, k, v, tq, tk, tv, mask: Mask, *, sm_scale: float, cfg: MosaicJvpConfig = MosaicJvpConfig(),
                interpret=None):
  """q [B, Lq, H, D], k/v [B, Lk, Hkv, D] and their tangents (None = symbolic zero; any Lq, Lk:
  `_pad_len`) -> (o, o_dot), both [B, Lq, H, D]. `unsupported_reason` decides which calls it takes."""
  import jax.experimental.pallas as pl  # noqa: PLC0415
  import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415

  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  block_q = COMPUTE_WGS * ROWS_PER_WG
  lq_m, lk_m = _round_up(lq, block_q), _round_up(lk, max(block_q, cfg.block_k))
  ins, n_iv, width = _schedule_inputs("forward_jvp", q.dtype, d, mask, lq, lk, lq_m, lk_m, block_q, cfg.block_k,
                                     rowmajor=True)
  qp, kp, vp = (_pad_len(x, n, interpret) for x, n in ((q, lq_m), (k, lk_m), (v, lk_m)))
  # absent tangents are not read (static flags); a 1-row dummy fills their argument slot
  dummy = lambda x: jnp.zeros((1, 1, x.shape[2], d), q.dtype)
  tqp = dummy(q) if tq is None else _pad_len(tq.astype(q.dtype), lq_m, interpret)
  tkp = dummy(k) if tk is None else _pad_len(tk.astype(q.dtype), lk_m, interpret)
  tvp = dummy(v) if tv is None else _pad_len(tv.astype(q.dtype), lk_m, interpret)
  regs = interpret is None
  bk, st = cfg.block_k, cfg.stages
  smem_tf = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  tile = lambda *shape: plgpu.SMEM(shape, q.dtype, transforms=smem_tf)
  ring = lambda present: tile(st, bk, d) if present else tile(1, 64, 64)  # an absent stream's ring: a stub
  scratch = [
      (tile(COMPUTE_WGS, ROWS_PER_WG, d), tile(COMPUTE_WGS, ROWS_PER_WG, d),
       plgpu.SMEM((COMPUTE_WGS, 2 * n_iv, ROWS_PER_WG), jnp.int32), tile(st, bk, d), tile(st, bk, d),
       ring(tk is not None), ring(tv is not None))
      + (() if regs else (plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG, bk), q.dtype),)),
      (*(plgpu.Barrier(num_barriers=st),) * 4, plgpu.Barrier(num_barriers=3 * COMPUTE_WGS)),
      (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=st),),
  ]
  kernel = functools.partial(
      _jvp_kernel, plgpu=plgpu, pl=pl, scale=sm_scale, scale2=sm_scale * LOG2E, width=width, block_k=bk,
      stages=st, group=h // hkv, n_iv=n_iv, regs=regs, has_tq=tq is not None, has_tk=tk is not None,
      has_tv=tv is not None)
  o, to = plgpu.kernel(
      kernel, out_type=[jax.ShapeDtypeStruct((b, lq_m, h, d), q.dtype)] * 2, scratch_types=scratch,
      grid=(h, lq_m // block_q, b), grid_names=("heads", "q_seq", "batch"), num_threads=COMPUTE_WGS + 1,
      thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True),
      **({} if interpret is None else dict(interpret=interpret)),
  )(*ins, qp, kp, vp, tqp, tkp, tvp)
  return o[:, :lq], to[:, :lq]
