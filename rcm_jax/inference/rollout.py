"""Chunk-by-chunk causal generation with a KV cache (Causal-rCM sections 4 SF-DMD and 6): the one rollout
used by SF-DMD training, the "rollout" eval sampler, streaming (`sample` job) and the play server.

Owns: the static cache plan (`CachePlan`: which frame slots of the preallocated cache hold which block when
each chunk is generated, rolling window with sink blocks, slots reused), the per-chunk step schedules and
their checks, one chunk's denoising against the cache (`chunk_step`), a generator over chunks
(`rollout_chunks`) and the whole video (`rollout`), `sample_videos` for the eval/sample jobs, and the
streaming generator `stream` (one jitted function per distinct chunk shape, optional int8 KV cache, and a
no-KV-cache mode that recomputes the context every chunk).

Cache: {"k", "v": [layers, B, S = cache_frames * tokens_per_frame, H, Dh]} zeros, updated with
`dynamic_update_slice` (static shapes). Keys are cached post-RoPE ("post_rope") or pre-RoPE ("pre_rope", rotated
at attention time at the slots' frame positions). A chunk's queries see the visible cache slots plus the chunk
itself (`masks.chunk_vs_cache`, the same visibility rule as `masks.block_causal`). `stream` allocates the
buffer with scratch rows after the S cache tokens (`init_cache(scratch_tokens=)`, rounded up to the kernels'
key tile): each layer writes the chunk's k/v there and attends over its entry of the [layers, ...] stack in
place (the layer loop carries the stacks; the Mosaic kernel reads by layer index), where slicing the layer's
cache and concatenating [cache | chunk] (padded to the tile) copies it every call. The stacks are threaded
through a chunk's calls, and the jitted chunk donates them, so nothing is copied. A chunk whose slot is still
empty while it is generated is attended in that slot instead of the scratch rows, so its write moves nothing
(`chunk_geometry`). Training rollouts concatenate (that path is differentiable).
Cache writes: clean context = an extra t=0 pass on the chunk's output (NFE = steps + 1); noisy context = the
exit step's own K/V (NFE = steps). The last block is never written.

Cross-attention: the text (and class tokens) condition every chunk alike, so `stream` projects every layer's
cross-attention k/v once (`WanModel(return_cross_kv=True)`) and each call reuses them; with live (callable)
conditions, once per chunk. Training rollouts project them in each call.

Chunks are unrolled in Python (the first block may differ in size and schedule, and each chunk's mask is
static); the steps within a chunk are a `fori_loop`, and the exit step may be traced (SF-DMD).

Streaming (`stream`): a chunk's static part (`ChunkGeometry`: frames, mask, write or not) is separate from its
dynamic part (`ChunkPositions`: RoPE frame positions, slot positions, write offset, all traced), so a stream
compiles one function per distinct geometry: with a rolling window every steady-state chunk has the same one.
`stream(runtime_masks=True)` moves an in-place chunk's mask (its key intervals, the same for every query row)
and its buffer row to the dynamic part too (`runtime_geometry`), so without a window the chunks of one size and
schedule share a function as well (a 21-frame frame-wise stream: 2 compiles, 3 when the first chunk takes other
steps, not 21). Off by default until a GPU run times it.
int8 KV cache (`kv_cache_dtype="int8"`): k/v stored as int8 with one fp32 scale per token and head (absmax /
127); dequantised inside the jitted chunk before the model call, the written rows quantised after it.
No KV cache (`kv_cache=False`): every chunk re-runs the model over all earlier frames (clean outputs at t = 0,
or the noisy exit-step inputs at their times) plus the chunk under `masks.block_causal` (window and sinks
included): the same frames as the cached path, at O(frames) cost per chunk (a reference and a fallback).

Gradients (SF-DMD): only the exit step's network call sees `params`; the steps before it (`prefix_params`),
their inputs and every cache write are under stop_gradient. The backward pass of chunk i's exit call needs the
cache as chunk i saw it, so a plain rollout keeps one cache copy per chunk (at Wan 1.3B, 21 frames: about
1.1 GiB per layer in bf16). Replayed backprop (`replay_backprop=True`) keeps one: a first pass runs the whole
rollout without gradients and keeps each chunk's exit-step input, then each chunk's exit call runs again with
gradients against the final cache, whose slots seen by chunk i still hold what they held then (its mask hides
the rest). That costs one more exit call's FLOPs per chunk. The first pass's cache (post-RoPE keys) has
scratch rows, so each of its chunks is attended inside the buffer like a stream's (a call that concatenates
builds a new k/v stack of every layer); so does a sampling rollout's (no exit steps). The exit calls run as
one call over the whole video (`replay_mask`), so the backward pass builds one parameter gradient, not one per
chunk (at Wan 1.3B, seven fp32 gradients alive at once were most of SF-DMD's temporary memory). Plans that
reuse slots (a rolling window shorter than the video) fall back to rematerialising each exit call.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.mask import KeyIntervals
from rcm_jax.diffusion import flow, samplers
from rcm_jax.errors import UserError
from rcm_jax.inference.causal_sample import (PER_FRAME_CONDITIONS, SOLVERS, _Pattern, chunk_times, concat_batch,
                                            slice_cond)
from rcm_jax.models import masks

CACHE_KEYS = ("post_rope", "pre_rope")


class RolloutConfigError(UserError):
  pass


# ----------------------------------------------------------------------------- static cache plan
@dataclasses.dataclass(frozen=True)
class CachePlan:
  """Static cache layout of one rollout. blocks[i] = (f0, f1) frames of block i; views[i] = block held by each
  cache frame slot (-1 empty) while block i is generated; writes[i] = first frame slot block i is written to
  (None: never read again, not written)."""
  num_frames: int
  cache_frames: int
  local_blocks: int | None
  sink_blocks: int
  blocks: tuple
  views: tuple
  writes: tuple

  def mask(self, i: int, tokens_per_frame: int, key_len: int | None = None, chunk_at: int | None = None):
    """Block i's Mask over keys [cache | chunk] (key_len: over a cache buffer of that many tokens; chunk_at:
    the chunk's key row, `masks.chunk_vs_cache`)."""
    f0, f1 = self.blocks[i]
    return masks.chunk_vs_cache(self.views[i], i, f1 - f0, tokens_per_frame, local_blocks=self.local_blocks,
                                sink_blocks=self.sink_blocks, key_len=key_len, chunk_at=chunk_at)

  def slot_positions(self, i: int) -> np.ndarray:
    """int32[cache_frames]: RoPE frame position of each slot's frame in view i (0 for empty slots)."""
    pos = np.zeros(self.cache_frames, np.int32)
    for s, j in enumerate(self.views[i]):
      if j >= 0:
        pos[s] = self.blocks[j][0] + (s - self._first_slot(i, j))
    return pos

  def _first_slot(self, i: int, j: int) -> int:
    return self.views[i].index(j)


def _needed_later(j: int, i: int, local_blocks, sink_blocks) -> bool:
  """Is the earlier block j visible from block i? (Then it must stay cached while block i is generated.)"""
  return any(lo <= j < hi for lo, hi in masks.visible_blocks(i, local_blocks=local_blocks,
                                                              sink_blocks=sink_blocks)) and j < i


def _simulate(blocks, capacity, local_blocks, sink_blocks):
  views, writes = [], []
  slots = [-1] * capacity
  nb = len(blocks)
  for i, (f0, f1) in enumerate(blocks):
    views.append(tuple(slots))
    if i == nb - 1 or not _needed_later(i, i + 1, local_blocks, sink_blocks):
      writes.append(None)
      continue
    slots = [j if j >= 0 and _needed_later(j, i + 1, local_blocks, sink_blocks) else -1 for j in slots]
    n, run, at = f1 - f0, 0, None
    for s in range(capacity):   # first fit
      run = run + 1 if slots[s] < 0 else 0
      if run == n:
        at = s - n + 1
        break
    if at is None:
      return None
    slots[at:at + n] = [i] * n
    writes.append(at)
  return tuple(views), tuple(writes)


def make_plan(pattern, num_frames: int, cache_frames: int = 0, *, key: str = "rollout.cache_frames") -> CachePlan:
  """The cache plan for `num_frames` under `pattern` (first_chunk_frames, chunk_frames, local_blocks, sink_blocks).
  cache_frames = 0: the smallest cache that fits. A given cache too small raises, naming `key`."""
  blocks = tuple(masks.block_frame_ranges(num_frames, first_chunk_frames=pattern.first_chunk_frames,
                                          chunk_frames=pattern.chunk_frames))
  lb, sb = pattern.local_blocks, pattern.sink_blocks
  if cache_frames:
    sim = _simulate(blocks, int(cache_frames), lb, sb)
    if sim is None:
      need = next(c for c in range(1, num_frames + 1) if _simulate(blocks, c, lb, sb) is not None)
      raise RolloutConfigError(
          f"a rollout of {num_frames} frames ({len(blocks)} blocks) needs a KV cache of at least {need} frames, "
          f"but {key}={cache_frames}" + ("" if lb else " and there is no rolling window (causal.local_blocks=0)")
          + f"; raise {key} (or 0 = fit) or set causal.local_blocks / causal.sink_blocks.")
    capacity = int(cache_frames)
  else:
    capacity = next(c for c in range(_live_frames(blocks, lb, sb), num_frames + 1)
                    if _simulate(blocks, c, lb, sb) is not None)
    sim = _simulate(blocks, capacity, lb, sb)
  return CachePlan(num_frames, capacity, lb, sb, blocks, *sim)


def _live_frames(blocks, local_blocks, sink_blocks) -> int:
  """Lower bound of the cache size: the most frames that must be cached at once (first fit may need more)."""
  best = 1
  for i in range(1, len(blocks)):
    best = max(best, sum(f1 - f0 for j, (f0, f1) in enumerate(blocks[:i])
                         if _needed_later(j, i, local_blocks, sink_blocks)))
  return best


KV_CACHE_DTYPES = ("float32", "bfloat16", "int8")
# The attention kernels' largest key tile: a cache buffer of this many tokens' multiple is never padded.
CACHE_TOKEN_MULTIPLE = 128


def init_cache(model, plan: CachePlan, batch: int, tokens_per_frame: int, dtype="float32",
               scratch_tokens: int = 0) -> dict:
  """{"k", "v": [layers, B, S, H, Dh]} zeros; int8 adds {"k_scale", "v_scale": fp32 [layers, B, S, H, 1]}.

  S = plan.cache_frames * tokens_per_frame. scratch_tokens > 0 (float caches): the buffer also has free rows
  [S, S + scratch_tokens) for the chunk being generated, rounded up to a multiple of CACHE_TOKEN_MULTIPLE; each
  chunk's k/v are then attended in place (`chunk_geometry`), not concatenated to a copy of the cache.
  """
  cfg = model.config
  tokens = plan.cache_frames * tokens_per_frame
  if scratch_tokens:
    if jnp.dtype(dtype) == jnp.int8:
      raise ValueError("an int8 KV cache takes no scratch rows (it is dequantised into a copy each call).")
    tokens = -(-(tokens + scratch_tokens) // CACHE_TOKEN_MULTIPLE) * CACHE_TOKEN_MULTIPLE
  shape = (cfg.num_layers, batch, tokens, cfg.num_heads, cfg.head_dim)
  if jnp.dtype(dtype) != jnp.int8:
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  ones = jnp.ones(shape[:-1] + (1,), jnp.float32)
  return {"k": jnp.zeros(shape, jnp.int8), "v": jnp.zeros(shape, jnp.int8), "k_scale": ones, "v_scale": ones}


def in_place_scratch(model, plan: CachePlan, tokens_per_frame: int, cache_keys: str, dtype) -> int:
  """Scratch tokens (`init_cache(scratch_tokens=)`) that let each chunk be attended inside the cache buffer: the
  largest chunk's, where the in-place path applies (post-RoPE keys in the model's compute dtype), else 0."""
  if cache_keys != "post_rope" or jnp.dtype(dtype) != jnp.dtype(model.config.compute_dtype):
    return 0
  return max(f1 - f0 for f0, f1 in plan.blocks) * tokens_per_frame


def quantize_int8(x):
  """Symmetric int8 per token and head: x [..., Dh] -> (q int8 [..., Dh], scale fp32 [..., 1]), x ~ q * scale.
  |x - q * scale| <= scale / 2 = absmax / 254 elementwise."""
  x = x.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
  return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def dequantize_int8(q, scale, dtype=jnp.float32):
  return (q.astype(jnp.float32) * scale).astype(dtype)


# ----------------------------------------------------------------------------- schedules
def check_schedule(times, key: str) -> np.ndarray:
  """float32[n + 1] times of one chunk: strictly decreasing from <= 1 to 0, else an error naming `key`."""
  t = np.asarray(times, np.float64)
  if t.ndim != 1 or t.size < 2 or not np.all(np.diff(t) < 0) or t[0] > 1.0 or t[-1] != 0.0:
    raise RolloutConfigError(f"{key}={tuple(np.ravel(t).tolist())}: a step schedule must be strictly decreasing "
                             "from t0 <= 1 down to 0, with at least one step.")
  return t.astype(np.float32)


def schedules_for(plan: CachePlan, solver: str, num_steps: int, shift: float = 1.0,
                  first_chunk_steps: int = 4) -> tuple:
  """Per-chunk schedules (section 6): consistency = the paper's few-step times (`first_chunk_steps` on the first
  chunk: the paper's 4), euler = the shifted Euler grid on every chunk."""
  return tuple(tuple(chunk_times(solver, num_steps, shift, i == 0, first_chunk_steps).tolist())
               for i in range(len(plan.blocks)))


# ----------------------------------------------------------------------------- one chunk
def _tpf(model, x):
  _, ph, pw = model.config.patch_size
  return (x.shape[2] // ph) * (x.shape[3] // pw)


@dataclasses.dataclass(frozen=True)
class ChunkGeometry:
  """The static part of one chunk's cached model call (hashable: the key of a stream's jitted chunk)."""
  frames: int            # frames in the chunk
  mask: object           # pallas_kernels.Mask [Lq, S + Lq] over keys [cache | chunk], or [Lq, buffer] in place
  write: bool            # are the chunk's k/v written to the cache?
  chunk_at: int | None = None   # in place: the buffer row where the chunk's k/v go (its slot, or the scratch rows)
  in_slot: bool = False   # chunk_at is the chunk's own (still empty) slot: its rows are already where they are kept
  runtime: bool = False   # in place, with the mask and chunk_at in the dynamic part (`runtime_geometry`)


RUNTIME_INTERVALS = 4   # key intervals of a run-time chunk mask: sinks, a window split by the ring, the chunk


def runtime_geometry(geom: ChunkGeometry) -> tuple[ChunkGeometry, dict]:
  """An in-place geometry with its mask and chunk row moved to the dynamic part: (static geometry, {key_intervals
  int32[RUNTIME_INTERVALS, 2], chunk_at int32[]}). Every query row of an in-place chunk mask allows the same keys
  (the visible slots and the chunk's rows), so the mask is those key intervals (`pallas_kernels.KeyIntervals`),
  and the chunks of one size that play one role (written in their slot, written from the scratch rows, or not
  written) share one compiled function."""
  if geom.chunk_at is None:
    raise ValueError("runtime_geometry needs an in-place geometry (a cache buffer with scratch rows).")
  iv = KeyIntervals.from_mask(geom.mask, RUNTIME_INTERVALS).intervals
  return (dataclasses.replace(geom, mask=None, chunk_at=None, runtime=True),
          {"key_intervals": iv, "chunk_at": np.int32(geom.chunk_at)})


def chunk_geometry(plan: CachePlan, i: int, tokens_per_frame: int, buffer_tokens: int | None = None
                   ) -> ChunkGeometry:
  """buffer_tokens: the cache buffer's length (cache["k"].shape[2]); longer than the plan's cache (scratch
  rows, `init_cache`): the chunk's k/v are attended in place. A chunk that is written to slots still empty
  while it is generated (every chunk of a cache that holds the whole video) is placed in those slots, so its
  write moves nothing; otherwise it goes to the scratch rows after the cache and the written rows are moved to
  the slot after the last layer (a slice and an update of every layer's rows)."""
  f0, f1 = plan.blocks[i]
  s = plan.cache_frames * tokens_per_frame
  write = plan.writes[i] is not None
  if buffer_tokens is None or buffer_tokens == s:
    return ChunkGeometry(f1 - f0, plan.mask(i, tokens_per_frame), write)
  in_slot = write and all(j < 0 for j in plan.views[i][plan.writes[i]:plan.writes[i] + f1 - f0])
  chunk_at = plan.writes[i] * tokens_per_frame if in_slot else s
  return ChunkGeometry(f1 - f0, plan.mask(i, tokens_per_frame, key_len=buffer_tokens, chunk_at=chunk_at), write,
                       chunk_at=chunk_at, in_slot=in_slot)


def chunk_positions(plan: CachePlan, i: int, tokens_per_frame: int) -> dict:
  """The dynamic part: frame_positions int32[n] (the chunk's RoPE frames), cache_positions int32[cache_frames]
  (slots' frames, read with pre-RoPE keys), write_at int32[] (token offset of the write; 0 if none)."""
  f0, f1 = plan.blocks[i]
  return {"frame_positions": np.arange(f0, f1, dtype=np.int32),
          "cache_positions": plan.slot_positions(i),
          "write_at": np.int32((plan.writes[i] or 0) * tokens_per_frame)}


def _cached_call(model, params, x, tt, cond, cache, *, geom, pos, cache_keys, write, cross_kv=None):
  """model.apply of one chunk against the cache; an int8 cache is dequantised here and its written rows
  quantised after the call. cross_kv: the conditions' cross-attention k/v (`_cross_kv`) or None (projected in
  the call). Returns (v, new cache)."""
  int8 = "k_scale" in cache
  fp = {k: dequantize_int8(cache[k], cache[k + "_scale"]) for k in "kv"} if int8 else cache
  write = write and geom.write
  mask, chunk_at = geom.mask, geom.chunk_at
  if geom.runtime:
    mask = KeyIntervals((geom.frames * _tpf(model, x), fp["k"].shape[2]), pos["key_intervals"])
    chunk_at = pos["chunk_at"]
  v, new = model.apply(params, x, tt, **cond, kv_cache=fp, mask=mask, frame_positions=pos["frame_positions"],
                       cache_positions=pos["cache_positions"] if cache_keys == "pre_rope" else None,
                       cache_write=pos["write_at"] if write and not geom.in_slot else None,
                       cache_chunk_at=chunk_at, cross_kv=cross_kv)
  if not write and chunk_at is None:   # nothing written: the model's cache output stays dead code (no copy)
    return v, cache
  if not int8:
    return v, new
  rows = geom.frames * _tpf(model, x)
  out = dict(cache)
  for k in "kv":
    written = jax.lax.dynamic_slice_in_dim(new[k], pos["write_at"], rows, axis=2)
    q, scale = quantize_int8(written)
    out[k] = jax.lax.dynamic_update_slice_in_dim(cache[k], q, pos["write_at"], axis=2)
    out[k + "_scale"] = jax.lax.dynamic_update_slice_in_dim(cache[k + "_scale"], scale, pos["write_at"], axis=2)
  return v, out


def _net(model, params, x, t, cond, null, cache, *, geom, pos, cfg_scale, cache_keys, write, cross_kv=None):
  """Model velocity on a chunk against the cache: x [B, n, H, W, C], t [] or [1, n] -> (v [B, n, H, W, C], new
  cache).
  CFG doubles the batch as [cond | null] (the cache then holds 2B rows, and cross_kv too)."""
  b, n = x.shape[:2]
  call = partial(_cached_call, model, params, geom=geom, pos=pos, cache_keys=cache_keys, write=write,
                 cross_kv=cross_kv)
  tt = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b, n))      # t: [] or per frame [1, n]
  if cfg_scale == 1.0:
    return call(x, tt, cond, cache)
  v, cache = call(jnp.concatenate([x, x]), jnp.concatenate([tt, tt]), concat_batch(cond, null), cache)
  return samplers.cfg(v[:b], v[b:], cfg_scale), cache


def _denoise(net, params, prefix_params, noise, times, *, solver, noisy_context, write, rng, exit_step,
             replay_backprop, state=None):
  """The steps of one chunk (shared by the cached and the recomputing paths).

  net(p, x, t, write, state) -> (v, state): state (the KV cache, or None) is threaded through the calls, so a
  cache buffer whose scratch rows each call rewrites stays one buffer, updated in place. Returns (x0, state
  after the chunk (stop-gradient'ed), x_exit: the exit step's input, what a noisy context keeps)."""
  times = jnp.asarray(times, jnp.float32)
  n_steps = times.shape[0] - 1
  exit_step = n_steps if exit_step is None else exit_step
  sg = jax.lax.stop_gradient
  pre = sg(params if prefix_params is None else prefix_params)
  key = jax.random.key(0) if rng is None else rng
  subs = []
  for _ in range(n_steps):
    key, sub = jax.random.split(key)
    subs.append(jax.random.key_data(sub))
  subs = jnp.stack(subs)                                   # the steps' noise keys, as key data
  x = sg(noise.astype(jnp.float32) * times[0])

  def body(s, carry):
    x, state = carry
    v, state = net(pre, x, times[s], False, state)
    if solver == "consistency":
      eps = jax.random.normal(jax.random.wrap_key_data(subs[s]), x.shape, jnp.float32)
      return samplers.consistency_step(x, times[s], times[s + 1], v, eps), state
    return samplers.euler_step(x, times[s], times[s + 1], v), state

  x, state = sg(jax.lax.fori_loop(0, exit_step - 1, body, (x, sg(state))))
  t_exit = times[exit_step - 1]

  def exit_call(p, x, state):
    v, c = net(p, x, t_exit, write and noisy_context, state)
    return flow.x0_from_velocity(x, t_exit, v), c

  if replay_backprop:   # rebuild this chunk's graph in the backward pass instead of storing it
    exit_call = jax.checkpoint(exit_call)
  x0, state = exit_call(params, x, state)
  if write and not noisy_context:   # clean context: an extra t=0 pass, no grad
    _, state = net(pre, sg(x0), jnp.zeros((), jnp.float32), True, sg(state))
  return x0, sg(state), x


def chunk_step(model, params, cache, noise, cond, null, *, plan: CachePlan, i: int, times, solver="consistency",
               cfg_scale=1.0, noisy_context=False, cache_keys="post_rope", rng=None, exit_step=None,
               prefix_params=None, replay_backprop=False, geom=None, pos=None, with_exit_input=False):
  """Denoise block i: noise [B, n, H, W, C] (the block's frames), cond/null already sliced to the block.

  times: the chunk's static schedule (n_steps + 1). exit_step: 1..n_steps (may be traced; default n_steps):
  steps before it run with stop_gradient(prefix_params or params); the exit step's call
  `x0 = x - t v_params(x, t)` keeps gradients and is the block's output. Returns (x0 [B, n, ...], new cache),
  the cache stop-gradient'ed. rng: the chunk's key; step s uses the s-th split (as `causal_sample.sample`).
  geom/pos: the chunk's static geometry and (possibly traced) positions; default: from plan and i.
  with_exit_input: also return the exit step's input (replayed backprop reruns the exit call from it).
  """
  tpf = _tpf(model, noise)
  geom = chunk_geometry(plan, i, tpf, cache["k"].shape[2]) if geom is None else geom
  pos = chunk_positions(plan, i, tpf) if pos is None else pos
  net = lambda p, x, t, write, cache: _net(model, p, x, t, cond, null, cache, geom=geom, pos=pos,
                                           cfg_scale=cfg_scale, cache_keys=cache_keys, write=write)
  x0, cache, x_exit = _denoise(net, params, prefix_params, noise, times, solver=solver, noisy_context=noisy_context,
                               write=geom.write, rng=rng, exit_step=exit_step, replay_backprop=replay_backprop,
                               state=cache)
  return (x0, cache, x_exit) if with_exit_input else (x0, cache)


# ----------------------------------------------------------------------------- whole rollout
def check_rollout_args(plan: CachePlan, schedules, solver: str, noisy_context, cache_keys: str,
                       key_prefix: str = "rollout") -> tuple:
  if solver not in SOLVERS:
    raise RolloutConfigError(f"{key_prefix}.solver={solver!r}: choose one of {SOLVERS}.")
  if cache_keys not in CACHE_KEYS:
    raise RolloutConfigError(f"{key_prefix}.cache_keys={cache_keys!r}: choose one of {CACHE_KEYS}.")
  if len(schedules) != len(plan.blocks):
    raise RolloutConfigError(f"{key_prefix}.schedules has {len(schedules)} chunk schedules for "
                             f"{len(plan.blocks)} blocks.")
  return tuple(tuple(check_schedule(s, f"{key_prefix}.schedules[{i}]").tolist()) for i, s in enumerate(schedules))


def rollout_chunks(model, params, noise, cond: dict, null: dict | None = None, *, plan: CachePlan, schedules,
                   solver="consistency", cfg_scale=1.0, noisy_context=False, cache_keys="post_rope", rng=None,
                   exit_steps=None, prefix_params=None, replay_backprop=False, cache=None):
  """Generator over blocks: yields (i, x0_i [B, n_i, H, W, C], cache after block i). noise: [B, T, H, W, C].
  The cache made here may hold scratch rows after its S tokens (attended in place; see `init_cache`).

  schedules: per-chunk static times; exit_steps: None (run every step) or [num_blocks] ints (may be traced).
  Chunk i's rng is fold_in(rng, i). replay_backprop with exit_steps (module docstring): the same blocks, each
  yielded with the final cache.
  """
  schedules = check_rollout_args(plan, schedules, solver, noisy_context, cache_keys)
  b = noise.shape[0] * (1 if cfg_scale == 1.0 else 2)
  replay = replay_backprop and exit_steps is not None and final_cache_serves_every_chunk(plan)
  if cache is None:   # in the compute dtype: attention reads k/v in it, so a bf16 model's bf16 cache is exact
    # Replay's first pass and a sampling rollout (no exit steps) take no gradients through the cache calls:
    # scratch rows let every chunk be attended inside the buffer (`chunk_geometry`), where each call would
    # otherwise build a new [layers, ...] stack of k and v.
    tpf, dtype = _tpf(model, noise), model.config.compute_dtype
    scratch = in_place_scratch(model, plan, tpf, cache_keys, dtype) if replay or exit_steps is None else 0
    cache = init_cache(model, plan, b, tpf, dtype, scratch_tokens=scratch)
  rng = jax.random.key(0) if rng is None else rng
  null = cond if null is None else null
  if replay:
    yield from _replayed_rollout_chunks(model, params, noise, cond, null, cache, plan=plan, schedules=schedules,
                                        solver=solver, cfg_scale=cfg_scale, noisy_context=noisy_context,
                                        cache_keys=cache_keys, rng=rng, exit_steps=exit_steps,
                                        prefix_params=prefix_params)
    return
  for i, (f0, f1) in enumerate(plan.blocks):
    x0, cache = chunk_step(model, params, cache, noise[:, f0:f1], slice_cond(cond, f0, f1),
                           slice_cond(null, f0, f1), plan=plan, i=i, times=schedules[i], solver=solver,
                           cfg_scale=cfg_scale, noisy_context=noisy_context, cache_keys=cache_keys,
                           rng=jax.random.fold_in(rng, i), prefix_params=prefix_params,
                           exit_step=None if exit_steps is None else exit_steps[i],
                           replay_backprop=replay_backprop)
    yield i, x0, cache


def final_cache_serves_every_chunk(plan: CachePlan) -> bool:
  """Does every slot a chunk sees hold the same block in the last view (no slot is ever reused)?"""
  last = plan.views[-1]
  return all(j < 0 or j == last[s] for view in plan.views for s, j in enumerate(view))


def replay_mask(plan: CachePlan, tokens_per_frame: int):
  """Mask[T*tpf, S + T*tpf]: every chunk's queries at once against keys `[final cache | all chunks]`. Chunk i's
  rows see the cache slots its own step saw (`plan.mask(i)`) and its own chunk (needs
  `final_cache_serves_every_chunk`)."""
  s, rects = plan.cache_frames * tokens_per_frame, []
  for i, (f0, _) in enumerate(plan.blocks):
    off = f0 * tokens_per_frame
    for q0, q1, k0, k1 in plan.mask(i, tokens_per_frame).ranges:
      rects.append((q0 + off, q1 + off) + ((k0, k1) if k1 <= s else (k0 + off, k1 + off)))
  n = plan.num_frames * tokens_per_frame
  return masks.Mask.from_ranges(n, s + n, rects)


def _replayed_rollout_chunks(model, params, noise, cond, null, cache, *, plan, schedules, solver, cfg_scale,
                             noisy_context, cache_keys, rng, exit_steps, prefix_params):
  """`rollout_chunks` with replayed backprop (module docstring): yields (i, x0_i, final cache)."""
  sg = jax.lax.stop_gradient
  tpf = _tpf(model, noise)
  frozen = sg(params if prefix_params is None else prefix_params)
  exits, t_exit = [], []
  for i, (f0, f1) in enumerate(plan.blocks):   # pass 1: no gradients; each chunk's exit-step input
    _, cache, x_exit = chunk_step(model, frozen, cache, noise[:, f0:f1], slice_cond(cond, f0, f1),
                                  slice_cond(null, f0, f1), plan=plan, i=i, times=schedules[i], solver=solver,
                                  cfg_scale=cfg_scale, noisy_context=noisy_context, cache_keys=cache_keys,
                                  rng=jax.random.fold_in(rng, i), exit_step=exit_steps[i], with_exit_input=True)
    exits.append(sg(x_exit))
    t_exit.append(jnp.full((f1 - f0,), jnp.asarray(schedules[i], jnp.float32)[exit_steps[i] - 1]))
  # pass 2: all exit calls with gradients as one call over the video (one parameter gradient, not one per chunk)
  x, t = jnp.concatenate(exits, axis=1), jnp.concatenate(t_exit)[None]         # [B, T, H, W, C], [1, T]
  last = len(plan.blocks) - 1
  geom = ChunkGeometry(plan.num_frames, replay_mask(plan, tpf), False)
  s = plan.cache_frames * tpf
  cache = {k: c[:, :, :s] for k, c in cache.items()}   # without scratch rows (`init_cache`), if it has any
  pos = {"frame_positions": np.arange(plan.num_frames, dtype=np.int32), "cache_positions": plan.slot_positions(last),
         "write_at": np.int32(0)}
  v, _ = _net(model, params, x, t, cond, null, cache, geom=geom, pos=pos, cfg_scale=cfg_scale,
              cache_keys=cache_keys, write=False)
  x0 = flow.x0_from_velocity(x, t, v)
  for i, (f0, f1) in enumerate(plan.blocks):
    yield i, x0[:, f0:f1], cache


def rollout(model, params, noise, cond: dict, null: dict | None = None, **kwargs):
  """The whole video [B, T, H, W, C] (see `rollout_chunks` for the arguments)."""
  return jnp.concatenate([x0 for _, x0, _ in rollout_chunks(model, params, noise, cond, null, **kwargs)], axis=1)


@partial(jax.jit, static_argnames=("model", "plan", "schedules", "solver", "cfg_scale", "noisy_context",
                                   "cache_keys"))
def _rollout_jit(model, params, noise, cond, null, rng, *, plan, schedules, solver, cfg_scale, noisy_context,
                 cache_keys):
  return rollout(model, params, noise, cond, null, plan=plan, schedules=schedules, solver=solver,
                 cfg_scale=cfg_scale, noisy_context=noisy_context, cache_keys=cache_keys, rng=rng)


def sample_videos(config, model, params, batch: dict, rng, *, num: int, num_steps: int | None = None,
                  cfg_scale: float | None = None, job: str = "eval"):
  """KV-cache causal samples for the first `num` conditions of `batch`: [num, T, H, W, C] numpy. Same signature
  and keys as `causal_sample.sample_videos`, plus <job>.cache_keys and <job>.cache_frames (0 = fit)."""
  section = config[job]
  take = lambda tree: jax.tree.map(lambda x: jnp.asarray(x[:num]), tree)
  r_noise, r_sample = jax.random.split(rng)
  noise = jax.random.normal(r_noise, batch["video"][:num].shape, jnp.float32)
  plan = make_plan(_Pattern(config.get("causal") or {}), noise.shape[1], int(section.get("cache_frames", 0)),
                   key=f"{job}.cache_frames")
  solver = section.get("solver", "consistency")
  schedules = schedules_for(plan, solver, int(num_steps or config.sample.steps), float(config.sample.shift),
                            int(section.get("first_chunk_steps", 4)))
  out = _rollout_jit(model, params, noise, take(batch["cond"]), take(batch["null"]), r_sample, plan=plan,
                     schedules=schedules, solver=solver,
                     cfg_scale=float(section.cfg_scale if cfg_scale is None else cfg_scale),
                     noisy_context=bool(section.get("noisy_context", False)),
                     cache_keys=section.get("cache_keys", "post_rope"))
  return np.asarray(out)


# ----------------------------------------------------------------------------- streaming
class StreamError(UserError):
  pass


@dataclasses.dataclass
class StreamChunk:
  """One finished chunk of a stream: block `index`, frames [f0, f1), video [B, n, H, W, C] (device array),
  seconds: wall time of its generation (ready on the device), compiled: did this chunk trigger a compile."""
  index: int
  f0: int
  f1: int
  video: jax.Array
  seconds: float
  compiled: bool


_STREAM_STATIC = ("model", "geom", "times", "solver", "cfg_scale", "noisy_context", "cache_keys")


def _cross_kv(model, params, x, cond, null, cfg_scale):
  """Every layer's cross-attention k/v of a chunk's conditions ([cond | null] under CFG, as `_net` batches
  them): {"k", "v": [layers, B or 2B, Lc, H, Dh]}, or None for a model without context tokens."""
  if cfg_scale != 1.0:
    x, cond = jnp.concatenate([x, x]), concat_batch(cond, null)
  return model.apply(params, x, jnp.zeros(x.shape[:2], jnp.float32), **cond, return_cross_kv=True)


_CROSS_KV = jax.jit(_cross_kv, static_argnames=("model", "cfg_scale"))


def _stream_chunk_impl(model, params, cache, noise, cond, null, pos, rng, cross_kv, *, geom, times, solver,
                       cfg_scale, noisy_context, cache_keys):
  """One streamed chunk. cross_kv: the stream's cross-attention k/v, or None: projected here, once for the
  chunk's calls (live conditions may change between chunks)."""
  if cross_kv is None:
    cross_kv = _cross_kv(model, params, noise, cond, null, cfg_scale)
  net = lambda p, x, t, write, cache: _net(model, p, x, t, cond, null, cache, geom=geom, pos=pos,
                                           cfg_scale=cfg_scale, cache_keys=cache_keys, write=write,
                                           cross_kv=cross_kv)
  x0, cache, _ = _denoise(net, params, None, noise, times, solver=solver, noisy_context=noisy_context,
                          write=geom.write, rng=rng, exit_step=None, replay_backprop=False, state=cache)
  return x0, cache


_STREAM_CHUNK = {}


def _stream_chunk_fn():
  """The jitted cached chunk; the cache is donated (updated in place) where the backend supports it."""
  donate = jax.default_backend() != "cpu"
  if donate not in _STREAM_CHUNK:
    _STREAM_CHUNK[donate] = jax.jit(_stream_chunk_impl, static_argnames=_STREAM_STATIC,
                                    donate_argnames=("cache",) if donate else ())
  return _STREAM_CHUNK[donate]


@partial(jax.jit, static_argnames=("model", "mask", "times", "solver", "cfg_scale", "noisy_context"))
def _recompute_chunk(model, params, ctx_x, ctx_t, noise, cond, null, rng, *, mask, times, solver, cfg_scale,
                     noisy_context):
  """No KV cache: chunk [B, n, ...] denoised with the model over [context frames ctx_x (times ctx_t) | chunk]
  under the block-causal `mask`; cond/null cover all those frames. Returns (x0, the exit step's input)."""
  f0 = ctx_x.shape[1]
  b, n = noise.shape[:2]

  def net(p, x, t, write, state):
    xf = jnp.concatenate([ctx_x, x], axis=1)
    tf = jnp.concatenate([ctx_t, jnp.full((b, n), t, jnp.float32)], axis=1)
    fn = lambda xf, tf, c: model.apply(p, xf, tf, **c, mask=mask)[:, f0:]
    if cfg_scale == 1.0:
      return fn(xf, tf, cond), None
    v = fn(jnp.concatenate([xf, xf]), jnp.concatenate([tf, tf]), concat_batch(cond, null))
    return samplers.cfg(v[:b], v[b:], cfg_scale), None

  x0, _, x_exit = _denoise(net, params, None, noise, times, solver=solver, noisy_context=noisy_context,
                           write=False, rng=rng, exit_step=None, replay_backprop=False)
  return x0, x_exit


def _block_inputs(source, name: str, i: int, f0: int, f1: int):
  """A dict of arrays covering every frame (sliced here) or a callable (i, f0, f1) -> the block's dict."""
  if callable(source):
    return source(i, f0, f1)
  return slice_cond(source, f0, f1) if name != "noise" else source[:, f0:f1]


def check_stream_conditions(model, cond_block: dict, key: str):
  """An action-conditioned model must get per-frame actions; else a StreamError naming `key`."""
  if model.config.num_actions > 0 and "actions" not in cond_block:
    raise StreamError(f"the model is action-conditioned (num_actions={model.config.num_actions}) but no actions "
                      f"were given: set {key} (one action per frame) or play it with `rcm_jax.main play`.")


def stream(model, params, noise, cond, null=None, *, plan: CachePlan, schedules, solver="consistency",
           cfg_scale=1.0, noisy_context=False, cache_keys="post_rope", kv_cache=True, kv_cache_dtype="float32",
           rng=None, actions_key="sample.actions", lookahead=None, in_place=True, runtime_masks=False):
  """Generator of `StreamChunk`s, each yielded as soon as its frames are ready.

  noise: [B, T, H, W, C] (T = plan.num_frames) or a callable (i, f0, f1) -> the block's noise [B, n, H, W, C].
  cond, null: condition dicts covering all T frames (per-frame keys sliced per block) or callables
  (i, f0, f1) -> the block's dict (the play server's live actions; called once per chunk). null=None: cond
  (unused at cfg_scale 1).
  kv_cache=False: recompute the context each chunk (same frames). kv_cache_dtype: float32 | bfloat16 | int8.
  Chunk i's rng is fold_in(rng, i), as in `rollout_chunks`.
  lookahead: dispatch chunk i+1 before waiting for chunk i, so the device never waits for the host between
  chunks (their input slicing and the jitted call's dispatch, ~10 ms a chunk at Wan scale). None: on unless
  noise, cond or null is a callable (live inputs are then read one chunk after the last one shown, not two).
  A chunk's `seconds` runs from its dispatch or from the previous chunk's arrival, whichever is later.
  in_place: post-RoPE caches in the model's compute dtype get scratch rows and each chunk is attended inside the
  cache buffer (module docstring); False concatenates [cache | chunk] as the training rollouts do (same frames).
  runtime_masks: in place, each chunk's mask and row are run-time inputs (`runtime_geometry`): every chunk of one
  size and schedule shares one compiled function (a 21-frame frame-wise stream: 2-3 compiles, not 21).
  """
  import time

  schedules = check_rollout_args(plan, schedules, solver, noisy_context, cache_keys)
  if kv_cache_dtype not in KV_CACHE_DTYPES:
    raise StreamError(f"kv_cache_dtype={kv_cache_dtype!r}: choose one of {KV_CACHE_DTYPES} "
                      "(config key sample.kv_cache_dtype).")
  max_len = model.config.rope_max_seq_len
  if plan.num_frames > max_len:
    raise StreamError(f"{plan.num_frames} frames exceed the model's RoPE table (rope_max_seq_len={max_len}); "
                      "generate fewer frames (sample.num_frames / play.max_frames).")
  if lookahead is None:
    lookahead = not any(callable(x) for x in (noise, cond, null))
  rng = jax.random.key(0) if rng is None else rng
  pattern = dict(first_chunk_frames=plan.blocks[0][1],
                 chunk_frames=max([f1 - f0 for f0, f1 in plan.blocks[1:]] or [1]),
                 local_blocks=plan.local_blocks, sink_blocks=plan.sink_blocks)
  chunk_fn = _stream_chunk_fn() if kv_cache else _recompute_chunk
  state = dict(cache=None, hist=None, cross_kv=None)
  shared_conditions = not (callable(cond) or callable(null))   # then the context is the same every chunk

  def dispatch(i, f0, f1):
    """Chunk i's inputs and its (asynchronous) jitted call: (i, f0, f1, x0 not yet ready, start, compiled)."""
    start = time.perf_counter()
    x_i = jnp.asarray(_block_inputs(noise, "noise", i, f0, f1), jnp.float32)
    c_i = jax.tree.map(jnp.asarray, _block_inputs(cond, "cond", i, f0, f1))
    n_i = c_i if null is None else jax.tree.map(jnp.asarray, _block_inputs(null, "null", i, f0, f1))
    check_stream_conditions(model, c_i, actions_key)
    tpf = _tpf(model, x_i)
    r_i = jax.random.fold_in(rng, i)
    size = chunk_fn._cache_size()
    if kv_cache:
      if state["cache"] is None:   # post-RoPE caches in the compute dtype get scratch rows: attended in place
        scratch = in_place_scratch(model, plan, tpf, cache_keys, kv_cache_dtype) if in_place else 0
        state["cache"] = init_cache(model, plan, x_i.shape[0] * (1 if cfg_scale == 1.0 else 2), tpf, kv_cache_dtype,
                                    scratch_tokens=scratch)
        if shared_conditions:   # the text's cross-attention k/v, projected once for the whole stream
          state["cross_kv"] = _CROSS_KV(model, params, x_i, c_i, n_i, cfg_scale=cfg_scale)
      pos = chunk_positions(plan, i, tpf)
      geom = chunk_geometry(plan, i, tpf, state["cache"]["k"].shape[2])
      if runtime_masks and geom.chunk_at is not None:
        geom, dynamic = runtime_geometry(geom)
        pos.update(dynamic)
      pos = jax.tree.map(jnp.asarray, pos)
      x0, state["cache"] = chunk_fn(model, params, state["cache"], x_i, c_i, n_i, pos, r_i, state["cross_kv"],
                                    geom=geom, times=schedules[i], solver=solver,
                                    cfg_scale=cfg_scale, noisy_context=noisy_context, cache_keys=cache_keys)
    else:
      hist = state["hist"]
      if hist is None:
        b = x_i.shape[0]
        hist = dict(x=jnp.zeros((b, 0) + x_i.shape[2:], jnp.float32), t=jnp.zeros((b, 0), jnp.float32),
                    cond=slice_cond(c_i, 0, 0), null=slice_cond(n_i, 0, 0))
      c_all, n_all = _append_frames(hist["cond"], c_i), _append_frames(hist["null"], n_i)
      mask = masks.block_causal(f1, tpf, **pattern)
      x0, x_exit = chunk_fn(model, params, hist["x"], hist["t"], x_i, c_all, n_all, r_i, mask=mask,
                            times=schedules[i], solver=solver, cfg_scale=cfg_scale, noisy_context=noisy_context)
      ctx, t_ctx = (x_exit, schedules[i][-2]) if noisy_context else (x0, 0.0)
      state["hist"] = dict(x=jnp.concatenate([hist["x"], ctx], axis=1),
                           t=jnp.concatenate([hist["t"], jnp.full(ctx.shape[:2], t_ctx, jnp.float32)], axis=1),
                           cond=c_all, null=n_all)
    return i, f0, f1, x0, start, chunk_fn._cache_size() > size

  last = time.perf_counter()

  def finish(job):
    nonlocal last
    i, f0, f1, x0, start, compiled = job
    x0 = jax.block_until_ready(x0)
    now = time.perf_counter()
    seconds, last = now - max(start, last), now
    return StreamChunk(i, f0, f1, x0, seconds, compiled)

  pending = []
  for i, (f0, f1) in enumerate(plan.blocks):
    pending.append(dispatch(i, f0, f1))
    if len(pending) > int(lookahead):
      yield finish(pending.pop(0))
  while pending:
    yield finish(pending.pop(0))


def _append_frames(hist: dict, block: dict) -> dict:
  """Per-frame conditions appended on the frame axis; the others replaced by the block's."""
  return {k: jnp.concatenate([hist[k], v], axis=1) if k in PER_FRAME_CONDITIONS else v for k, v in block.items()}
