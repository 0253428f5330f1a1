"""Static attention masks and the per-tile schedules the kernels read.

A `Mask` is a trace-time constant (hashable, numpy-backed), never a traced array. It is either a
dense boolean matrix (small cases, tests) or a union of allowed rectangles `(q0, q1, k0, k1)` (the
video masks, which stay cheap at 131k x 131k tokens). `True` means "query may attend to key".

`tile_schedule(mask, Lq_pad, Lk_pad, block_q, block_k)` classifies every tile EMPTY / PARTIAL / FULL and
lists, per query tile and per key tile, the tiles to compute (partial first, then full). For rectangles
this is analytic: rows between consecutive rectangle edges ("segments") share one list of allowed key
intervals, so the work is O(segments x key tiles), never O(Lq x Lk) (a Wan teacher-forcing mask of
131,040 tokens builds in well under a second). Element masks of partial tiles are computed in-kernel
from per-row key intervals `starts/ends [R, Lq_pad]` (R <= 3 for the video masks): R compare pairs
against a column iota, no stored [bq, bk] blocks, so nothing to deduplicate. Dense masks with many runs
per row (random test masks) fall back to loading the tile of the dense int8 matrix.

`KeyIntervals` is the one run-time mask: the same key intervals for every query row, as a traced int32[R, 2]
(a streamed chunk inside the KV-cache buffer); `runtime_schedule` builds its row lists inside the graph.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class Mask:
  """Boolean attention mask of shape [Lq, Lk]; build with `from_dense` or `from_ranges`."""

  def __init__(self, shape: tuple[int, int], *, dense: np.ndarray | None = None,
               ranges: tuple[tuple[int, int, int, int], ...] | None = None):
    if (dense is None) == (ranges is None):
      raise ValueError("Mask needs exactly one of dense= or ranges=.")
    self.shape = (int(shape[0]), int(shape[1]))
    self._dense = dense
    self.ranges = ranges

  @classmethod
  def from_dense(cls, dense) -> "Mask":
    dense = np.asarray(dense)
    if dense.ndim != 2 or dense.dtype != np.bool_:
      raise ValueError(f"Mask.from_dense wants a bool[Lq, Lk] array, got {dense.dtype}{list(dense.shape)}.")
    dense = np.ascontiguousarray(dense)
    dense.setflags(write=False)
    return cls(dense.shape, dense=dense)

  @classmethod
  def from_ranges(cls, lq: int, lk: int, ranges: Iterable[Sequence[int]]) -> "Mask":
    out = []
    for r in ranges:
      q0, q1, k0, k1 = (int(x) for x in r)
      if not (0 <= q0 <= q1 <= lq and 0 <= k0 <= k1 <= lk):
        raise ValueError(f"Mask.from_ranges: rectangle {(q0, q1, k0, k1)} is outside [0, {lq}) x [0, {lk}) "
                         "or has start > end.")
      if q1 > q0 and k1 > k0:
        out.append((q0, q1, k0, k1))
    return cls((lq, lk), ranges=tuple(sorted(set(out))))

  @classmethod
  def full(cls, lq: int, lk: int) -> "Mask":
    return cls.from_ranges(lq, lk, [(0, lq, 0, lk)])

  def to_dense(self) -> np.ndarray:
    if self._dense is not None:
      return self._dense
    dense = np.zeros(self.shape, np.bool_)
    for q0, q1, k0, k1 in self.ranges:
      dense[q0:q1, k0:k1] = True
    return dense

  def density(self) -> float:
    """Fraction of allowed (query, key) pairs; analytic for rectangles (no dense matrix)."""
    if self._dense is not None:
      return float(self._dense.mean())
    allowed = sum((b - a) * sum(e - s for s, e in iv) for a, b, iv in _row_segments(self))
    return allowed / float(self.shape[0] * self.shape[1])

  def _key(self):
    if self._dense is not None:
      return (self.shape, "dense", self._dense.tobytes())
    return (self.shape, "ranges", self.ranges)

  def __hash__(self):
    return hash(self._key())

  def __eq__(self, other):
    return isinstance(other, Mask) and self._key() == other._key()

  def __repr__(self):
    kind = "dense" if self._dense is not None else f"{len(self.ranges)} rectangles"
    return f"Mask({self.shape[0]}x{self.shape[1]}, {kind})"


# ----------------------------------------------------------------------------------------------
# Row intervals and tile schedules (what the kernels read).
#
# Element masks inside a tile are computed in-kernel, not stored per tile: every query row keeps
# up to R allowed key intervals `[start, end)` (R = the most any row needs: 1 for full/causal-like
# masks, 2-3 for the teacher-forcing and sink+window video masks), so a partial tile costs R pairs
# of compares against a column iota. The arrays are [R, Lq] int32, built per row *segment* (rows
# between consecutive rectangle edges share one interval list), so 131k x 131k masks never touch a
# dense matrix. Dense masks whose rows need more than `MAX_INTERVALS` runs (random test masks) keep
# their dense int8 matrix instead, and the kernel loads the tile of it.
# ----------------------------------------------------------------------------------------------

MAX_INTERVALS = 8
EMPTY, PARTIAL, FULL = 0, 1, 2


def _merge(intervals):
  """Sorted disjoint, non-touching union of half-open intervals."""
  out = []
  for s, e in sorted(intervals):
    if out and s <= out[-1][1]:
      out[-1][1] = max(out[-1][1], e)
    else:
      out.append([s, e])
  return [tuple(x) for x in out]


def _row_segments(mask: Mask):
  """[(q0, q1, intervals)] covering [0, Lq): rows of one segment allow the same key intervals."""
  lq = mask.shape[0]
  if mask.ranges is not None:
    edges = sorted({0, lq} | {r[0] for r in mask.ranges} | {r[1] for r in mask.ranges})
    segs = []
    for a, b in zip(edges[:-1], edges[1:]):
      iv = _merge([(k0, k1) for q0, q1, k0, k1 in mask.ranges if q0 <= a and b <= q1])
      segs.append((a, b, iv))
    return segs
  dense = mask.to_dense()
  padded = np.zeros((lq, dense.shape[1] + 2), np.int8)
  padded[:, 1:-1] = dense
  diff = np.diff(padded, axis=1)  # +1 at run starts, -1 at run ends
  segs = []
  for i in range(lq):
    starts, = np.nonzero(diff[i] == 1)
    ends, = np.nonzero(diff[i] == -1)
    segs.append((i, i + 1, list(zip(starts.tolist(), ends.tolist()))))
  return segs


class TileSchedule:
  """Per-tile work lists for one (Mask, padded lengths, tile sizes), built once at trace time.

  Tiles are classified EMPTY (skipped), FULL (no element mask) or PARTIAL (element mask applied).
  Row-major lists drive the forward, dq and JVP kernels (one program per query tile, looping over
  key tiles); column-major lists drive the dk/dv kernel. Each list holds partial tiles first, then
  full ones, so a kernel runs two loops and the full-tile loop has no mask code in it.

  Attributes (numpy int32):
    kv_tiles [nq * wq]: key-tile indices for query tile i at [i*wq, i*wq + kv_partial[i] + kv_full[i]).
    kv_partial, kv_full [nq]. q_tiles [nk * wk], q_partial, q_full [nk]: the transposed lists.
    kv_order [nq], q_order [nk]: the tiles by decreasing work (stable), the order in which a kernel that
      launches one program per tile hands them out, so the longest start first and the last wave is short.
    starts, ends [R, Lq_pad]: allowed key intervals per row (intervals mode), or dense [Lq_pad, Lk_pad]
      int8 (dense mode). Padded rows allow nothing; padded keys are never allowed.
    tile_state [nq, nk]: EMPTY / PARTIAL / FULL (small: one byte per tile).
    single_run: intervals mode, and no key tile is touched by two intervals of one row, so a row's allowed keys
      within any tile are one range (the Mosaic kernels then mask a partial tile with two compares an element).
  """

  def __init__(self, mask: Mask, lq_pad: int, lk_pad: int, block_q: int, block_k: int):
    lq, lk = mask.shape
    self.block_q, self.block_k = block_q, block_k
    nq, nk = lq_pad // block_q, lk_pad // block_k
    segs = _row_segments(mask)
    r_max = max(1, max(len(iv) for _, _, iv in segs))
    self.mode = "intervals" if (mask.ranges is not None or r_max <= MAX_INTERVALS) else "dense"

    # State of every (segment, key tile). Padded key columns are never covered, so the last tile of a
    # ragged Lk is at most PARTIAL.
    seg_state = np.zeros((len(segs), nk), np.int8)
    max_runs = 0
    for si, (_, _, iv) in enumerate(segs):
      seg_state[si], runs = _key_tile_states(np.asarray(iv, np.int64).reshape(-1, 2), nk, block_k)
      max_runs = max(max_runs, int(runs.max(initial=0)))
    self.single_run = self.mode == "intervals" and max_runs <= 1

    # A query tile combines the segments of its real rows (padded rows are don't-care: their
    # outputs are sliced off and their q / dO are zero).
    seg_starts = np.array([a for a, _, _ in segs])
    state = np.zeros((nq, nk), np.int8)
    for i in range(nq):
      r0, r1 = i * block_q, min((i + 1) * block_q, lq)
      s0 = np.searchsorted(seg_starts, r0, side="right") - 1
      s1 = np.searchsorted(seg_starts, r1 - 1, side="right")
      block = seg_state[s0:s1]
      lo, hi = block.min(0), block.max(0)
      state[i] = np.where(lo == FULL, FULL, np.where(hi > EMPTY, PARTIAL, EMPTY))
    self.tile_state = state

    self.kv_tiles, self.kv_partial, self.kv_full = _work_lists(state)
    self.q_tiles, self.q_partial, self.q_full = _work_lists(state.T)
    self.wq = len(self.kv_tiles) // nq
    self.wk = len(self.q_tiles) // nk
    self.kv_order = _heaviest_first(self.kv_partial + self.kv_full)
    self.q_order = _heaviest_first(self.q_partial + self.q_full)

    if self.mode == "intervals":
      starts = np.zeros((r_max, lq_pad), np.int32)
      ends = np.zeros((r_max, lq_pad), np.int32)
      for a, b, iv in segs:
        for r, (s, e) in enumerate(iv):
          starts[r, a:b], ends[r, a:b] = s, e
      self.mask_arrays = (starts, ends)
    else:
      dense = np.zeros((lq_pad, lk_pad), np.int8)
      dense[:lq, :lk] = mask.to_dense()
      self.mask_arrays = (dense,)

  def computed_fraction(self) -> float:
    """Fraction of tiles that a kernel computes (partial + full)."""
    return float((self.tile_state > EMPTY).mean())


def _key_tile_states(intervals, nk: int, block_k: int, xp=np):
  """(states, runs) of nk key tiles under key intervals [R, 2] ([start, end), empty ones ignored). states: FULL
  if one interval covers the tile, else PARTIAL if any touches it, else EMPTY. runs: how many intervals touch
  the tile. xp: numpy (static schedules) or jax.numpy (`runtime_schedule`, traced intervals)."""
  s, e = intervals[:, 0:1], intervals[:, 1:2]                          # [R, 1]
  lo = xp.arange(nk)[None, :] * block_k                                 # [1, nk]
  hi = lo + block_k
  covered = ((s <= lo) & (hi <= e) & (s < e)).any(axis=0)
  runs = ((s < hi) & (e > lo) & (s < e)).sum(axis=0)
  return xp.where(covered, FULL, xp.where(runs > 0, PARTIAL, EMPTY)), runs


def _partial_first(state, xp=np):
  """Tile indices along the last axis, PARTIAL first, FULL next, EMPTY last, index order kept within each."""
  key = xp.where(state == PARTIAL, 0, xp.where(state == FULL, 1, 2))
  return np.argsort(key, axis=-1, kind="stable") if xp is np else xp.argsort(key, axis=-1, stable=True)


def _work_lists(state: np.ndarray):
  """state [n, m] -> (tiles [n * w] int32, n_partial [n], n_full [n]); partial tiles listed first."""
  n = state.shape[0]
  n_partial = (state == PARTIAL).sum(1).astype(np.int32)
  n_full = (state == FULL).sum(1).astype(np.int32)
  w = max(1, int((n_partial + n_full).max()))
  order = _partial_first(state)[:, :w].astype(np.int32)
  return np.ascontiguousarray(order.reshape(n * w)), n_partial, n_full


def _heaviest_first(work: np.ndarray) -> np.ndarray:
  return np.argsort(-work, kind="stable").astype(np.int32)


_SCHEDULES: dict = {}


def tile_schedule(mask: Mask, lq_pad: int, lk_pad: int, block_q: int, block_k: int) -> TileSchedule:
  """Cached `TileSchedule` (a Mask is hashable, so re-tracing the same model reuses the lists)."""
  key = (mask, lq_pad, lk_pad, block_q, block_k)
  if key not in _SCHEDULES:
    if len(_SCHEDULES) > 64:
      _SCHEDULES.clear()
    _SCHEDULES[key] = TileSchedule(mask, lq_pad, lk_pad, block_q, block_k)
  return _SCHEDULES[key]


# ----------------------------------------------------------------------------------------------
# Run-time masks: one executable for many masks.
#
# A streamed chunk attended inside the KV-cache buffer sees the same keys from every query row: the visible
# cache slots and its own rows. Only which intervals those are changes from chunk to chunk. `KeyIntervals`
# carries them as a traced int32[R, 2], so every chunk of one size compiles once; `runtime_schedule` builds
# the kernels' tile lists from them inside the graph (the same lists `TileSchedule` builds in numpy, padded to
# every key tile). Forward only (`flash_attention_stacked`).
# ----------------------------------------------------------------------------------------------

@jax.tree_util.register_pytree_node_class
class KeyIntervals:
  """A [Lq, Lk] mask whose every query row may attend to the same key intervals, given at run time.

  intervals: int32[R, 2] rows [start, end) (may be traced); (0, 0) rows are unused. shape: the static
  (Lq, Lk). A pytree (the intervals are its leaf), so it passes through jit and scan as an argument.
  """

  def __init__(self, shape: tuple[int, int], intervals):
    self.shape = (int(shape[0]), int(shape[1]))
    self.intervals = intervals

  @classmethod
  def from_mask(cls, mask: Mask, num_intervals: int) -> "KeyIntervals":
    """The same mask as a static `Mask` whose rows all allow the same keys, with num_intervals rows (numpy)."""
    segs = _row_segments(mask)
    ivs = segs[0][2]
    if any(iv != ivs for _, _, iv in segs):
      raise ValueError(f"KeyIntervals.from_mask: {mask} allows different keys in different query rows.")
    if len(ivs) > num_intervals:
      raise ValueError(f"KeyIntervals.from_mask: {mask} needs {len(ivs)} key intervals, more than "
                       f"num_intervals={num_intervals}.")
    out = np.zeros((num_intervals, 2), np.int32)
    if ivs:
      out[:len(ivs)] = ivs
    return cls(mask.shape, out)

  def to_dense(self):
    """bool[Lq, Lk] (a jax array)."""
    iv = jnp.asarray(self.intervals)
    col = jnp.arange(self.shape[1])[None, :]
    keys = ((col >= iv[:, :1]) & (col < iv[:, 1:])).any(axis=0)
    return jnp.broadcast_to(keys[None, :], self.shape)

  def tree_flatten(self):
    return (self.intervals,), self.shape

  @classmethod
  def tree_unflatten(cls, shape, children):
    return cls(shape, children[0])

  def __repr__(self):
    return f"KeyIntervals({self.shape[0]}x{self.shape[1]}, {np.shape(self.intervals)[0]} intervals)"


class RuntimeSchedule:
  """The row-major part of a `TileSchedule` for a `KeyIntervals` mask, as jax arrays built in the graph
  (`runtime_schedule`): kv_tiles [nq * nk], kv_partial, kv_full [nq], kv_order [nq], wq = nk, mode "intervals",
  mask_arrays (starts, ends) [R, Lq_pad] (rows past Lq allow nothing). Every query tile has the same list."""
  mode = "intervals"

  def __init__(self, kv_tiles, kv_partial, kv_full, kv_order, wq, mask_arrays):
    self.kv_tiles, self.kv_partial, self.kv_full, self.kv_order = kv_tiles, kv_partial, kv_full, kv_order
    self.wq, self.mask_arrays = wq, mask_arrays


def runtime_schedule(mask: KeyIntervals, lq_pad: int, lk_pad: int, block_q: int, block_k: int) -> RuntimeSchedule:
  """`TileSchedule`'s row-major lists for a run-time mask, from the same tile rule (`_key_tile_states`) and order
  (`_partial_first`), padded with the empty tiles to every key tile."""
  lq = mask.shape[0]
  nq, nk = lq_pad // block_q, lk_pad // block_k
  iv = jnp.asarray(mask.intervals, jnp.int32)
  s, e = iv[:, 0:1], iv[:, 1:2]                                        # [R, 1]
  state, _ = _key_tile_states(iv, nk, block_k, jnp)                     # [nk]
  order = _partial_first(state, jnp)
  n_partial = jnp.full((nq,), (state == PARTIAL).sum(), jnp.int32)
  n_full = jnp.full((nq,), (state == FULL).sum(), jnp.int32)
  tiles = jnp.tile(order.astype(jnp.int32), nq)
  real = jnp.arange(lq_pad)[None, :] < lq                               # padded rows allow nothing
  starts = jnp.where(real, jnp.broadcast_to(s, (s.shape[0], lq_pad)), 0).astype(jnp.int32)
  ends = jnp.where(real, jnp.broadcast_to(e, (e.shape[0], lq_pad)), 0).astype(jnp.int32)
  return RuntimeSchedule(tiles, n_partial, n_full, jnp.arange(nq, dtype=jnp.int32), nk, (starts, ends))
