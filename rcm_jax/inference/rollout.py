"""Chunk-by-chunk causal generation with a KV cache (Causal-rCM sections 4 SF-DMD and 6): the one rollout
used by SF-DMD training, the "rollout" eval sampler and (later) streaming.

Owns: the static cache plan (`CachePlan`: which frame slots of the preallocated cache hold which block when
each chunk is generated, rolling window with sink blocks, slots reused), the per-chunk step schedules and
their checks, one chunk's denoising against the cache (`chunk_step`), a generator over chunks
(`rollout_chunks`) and the whole video (`rollout`), plus `sample_videos` for the eval/sample jobs.

Cache: {"k", "v": [layers, B, S = cache_frames * tokens_per_frame, H, Dh]} zeros, updated with
`dynamic_update_slice` (static shapes). Keys are cached post-RoPE ("post_rope") or pre-RoPE ("pre_rope", rotated
at attention time at the slots' frame positions). A chunk's queries see the visible cache slots plus the chunk
itself (`masks.chunk_vs_cache`, the same visibility rule as `masks.block_causal`).
Cache writes: clean context = an extra t=0 pass on the chunk's output (NFE = steps + 1); noisy context = the
exit step's own K/V (NFE = steps). The last block is never written.

Chunks are unrolled in Python (the first block may differ in size and schedule, and each chunk's mask is
static); the steps within a chunk are a `fori_loop`, and the exit step may be traced (SF-DMD).

Gradients (SF-DMD): only the exit step's network call sees `params`; the steps before it (`prefix_params`),
their inputs and every cache write are under stop_gradient.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from rcm_jax.diffusion import flow, samplers
from rcm_jax.errors import UserError
from rcm_jax.inference.causal_sample import SOLVERS, _Pattern, chunk_times, concat_batch, slice_cond
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

  def mask(self, i: int, tokens_per_frame: int):
    f0, f1 = self.blocks[i]
    return masks.chunk_vs_cache(self.views[i], i, f1 - f0, tokens_per_frame, local_blocks=self.local_blocks,
                                sink_blocks=self.sink_blocks)

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
    capacity = next(c for c in range(1, num_frames + 1) if _simulate(blocks, c, lb, sb) is not None)
    sim = _simulate(blocks, capacity, lb, sb)
  return CachePlan(num_frames, capacity, lb, sb, blocks, *sim)


def init_cache(model, plan: CachePlan, batch: int, tokens_per_frame: int, dtype=jnp.float32) -> dict:
  cfg = model.config
  shape = (cfg.num_layers, batch, plan.cache_frames * tokens_per_frame, cfg.num_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


# ----------------------------------------------------------------------------- schedules
def check_schedule(times, key: str) -> np.ndarray:
  """float32[n + 1] times of one chunk: strictly decreasing from <= 1 to 0, else an error naming `key`."""
  t = np.asarray(times, np.float64)
  if t.ndim != 1 or t.size < 2 or not np.all(np.diff(t) < 0) or t[0] > 1.0 or t[-1] != 0.0:
    raise RolloutConfigError(f"{key}={tuple(np.ravel(t).tolist())}: a step schedule must be strictly decreasing "
                             "from t0 <= 1 down to 0, with at least one step.")
  return t.astype(np.float32)


def schedules_for(plan: CachePlan, solver: str, num_steps: int, shift: float = 1.0) -> tuple:
  """Per-chunk schedules (section 6): consistency = the paper's few-step times (4 steps on the first chunk),
  euler = the shifted Euler grid on every chunk."""
  return tuple(tuple(chunk_times(solver, num_steps, shift, i == 0).tolist()) for i in range(len(plan.blocks)))


# ----------------------------------------------------------------------------- one chunk
def _tpf(model, x):
  _, ph, pw = model.config.patch_size
  return (x.shape[2] // ph) * (x.shape[3] // pw)


def _net(model, params, plan, i, x, t, cond, null, cache, *, cfg_scale, cache_keys, write):
  """Model velocity on chunk i against the cache: x [B, n, H, W, C], t [] -> (v [B, n, H, W, C], new cache).
  CFG doubles the batch as [cond | null] (the cache then holds 2B rows)."""
  b, n = x.shape[:2]
  f0, f1 = plan.blocks[i]
  tpf = _tpf(model, x)
  kw = dict(mask=plan.mask(i, tpf), frame_positions=np.arange(f0, f1),
            cache_positions=plan.slot_positions(i) if cache_keys == "pre_rope" else None,
            cache_write=None if (not write or plan.writes[i] is None) else plan.writes[i] * tpf)
  tt = jnp.full((b, n), t, jnp.float32)
  if cfg_scale == 1.0:
    return model.apply(params, x, tt, **cond, kv_cache=cache, **kw)
  both = concat_batch(cond, null)
  v, cache = model.apply(params, jnp.concatenate([x, x]), jnp.concatenate([tt, tt]), **both, kv_cache=cache, **kw)
  return samplers.cfg(v[:b], v[b:], cfg_scale), cache


def chunk_step(model, params, cache, noise, cond, null, *, plan: CachePlan, i: int, times, solver="consistency",
               cfg_scale=1.0, noisy_context=False, cache_keys="post_rope", rng=None, exit_step=None,
               prefix_params=None, replay_backprop=False):
  """Denoise block i: noise [B, n, H, W, C] (the block's frames), cond/null already sliced to the block.

  times: the chunk's static schedule (n_steps + 1). exit_step: 1..n_steps (may be traced; default n_steps):
  steps before it run with stop_gradient(prefix_params or params); the exit step's call
  `x0 = x - t v_params(x, t)` keeps gradients and is the block's output. Returns (x0 [B, n, ...], new cache),
  the cache stop-gradient'ed. rng: the chunk's key; step s uses the s-th split (as `causal_sample.sample`).
  """
  times = jnp.asarray(times, jnp.float32)
  n_steps = times.shape[0] - 1
  exit_step = n_steps if exit_step is None else exit_step
  sg = jax.lax.stop_gradient
  cache = sg(cache)
  pre = sg(params if prefix_params is None else prefix_params)
  net = partial(_net, model, plan=plan, i=i, cond=cond, null=null, cfg_scale=cfg_scale, cache_keys=cache_keys)
  key = jax.random.key(0) if rng is None else rng
  subs = []
  for _ in range(n_steps):
    key, sub = jax.random.split(key)
    subs.append(jax.random.key_data(sub))
  subs = jnp.stack(subs)                                   # the steps' noise keys, as key data
  x = sg(noise.astype(jnp.float32) * times[0])

  def body(s, x):
    v, _ = net(pre, x=x, t=times[s], cache=cache, write=False)
    if solver == "consistency":
      eps = jax.random.normal(jax.random.wrap_key_data(subs[s]), x.shape, jnp.float32)
      return samplers.consistency_step(x, times[s], times[s + 1], v, eps)
    return samplers.euler_step(x, times[s], times[s + 1], v)

  x = sg(jax.lax.fori_loop(0, exit_step - 1, body, x))
  t_exit = times[exit_step - 1]

  def exit_call(p, x):
    v, c = net(p, x=x, t=t_exit, cache=cache, write=noisy_context)
    return flow.x0_from_velocity(x, t_exit, v), c

  if replay_backprop:   # rebuild this chunk's graph in the backward pass instead of storing it
    exit_call = jax.checkpoint(exit_call)
  x0, new_cache = exit_call(params, x)
  if not noisy_context and plan.writes[i] is not None:   # clean context: an extra t=0 pass, no grad
    _, new_cache = net(pre, x=sg(x0), t=jnp.zeros((), jnp.float32), cache=cache, write=True)
  return x0, sg(new_cache)


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

  schedules: per-chunk static times; exit_steps: None (run every step) or [num_blocks] ints (may be traced).
  Chunk i's rng is fold_in(rng, i).
  """
  schedules = check_rollout_args(plan, schedules, solver, noisy_context, cache_keys)
  b = noise.shape[0] * (1 if cfg_scale == 1.0 else 2)
  if cache is None:
    cache = init_cache(model, plan, b, _tpf(model, noise))
  rng = jax.random.key(0) if rng is None else rng
  null = cond if null is None else null
  for i, (f0, f1) in enumerate(plan.blocks):
    x0, cache = chunk_step(model, params, cache, noise[:, f0:f1], slice_cond(cond, f0, f1),
                           slice_cond(null, f0, f1), plan=plan, i=i, times=schedules[i], solver=solver,
                           cfg_scale=cfg_scale, noisy_context=noisy_context, cache_keys=cache_keys,
                           rng=jax.random.fold_in(rng, i), prefix_params=prefix_params,
                           exit_step=None if exit_steps is None else exit_steps[i],
                           replay_backprop=replay_backprop)
    yield i, x0, cache


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
  schedules = schedules_for(plan, solver, int(num_steps or config.sample.steps), float(config.sample.shift))
  out = _rollout_jit(model, params, noise, take(batch["cond"]), take(batch["null"]), r_sample, plan=plan,
                     schedules=schedules, solver=solver,
                     cfg_scale=float(section.cfg_scale if cfg_scale is None else cfg_scale),
                     noisy_context=bool(section.get("noisy_context", False)),
                     cache_keys=section.get("cache_keys", "post_rope"))
  return np.asarray(out)
