"""Chunk-by-chunk causal sampling WITHOUT a KV cache: the reference the KV-cache rollout must agree with.

Block i (frames [f0, f1)) is denoised with the model run over the whole prefix [context frames 0..f0 |
current chunk] under the block-causal mask (window and sinks included), so every step recomputes the context:
O(blocks^2) work, fine at toy scale and obviously correct. The context is each earlier chunk's output at
t = 0 ("clean context", NFE = steps + 1 per chunk with a cache) or, with `noisy_context`, the last step's
input at its time (NFE = steps).

Solvers (Causal-rCM section 6):
  "consistency": distilled students. x = eps * T0, each step x0_hat = x - t v, re-noised to t_next with fresh
                 noise; times: the paper's 4-step [1600/1601, 15/16, 5/6, 5/8, 0]; 2- and 1-step runs use
                 4 steps on the first chunk, then [T0, 5/6, 0] or [T0, 0].
  "euler":       diffusion models (TF / DF stages, causal teachers). Euler ODE on `time_grid(steps, shift)`.
Teachers use CFG (`cfg_scale` != 1: one batched pass over [cond | null]); distilled students cfg_scale = 1.

Eval wiring: `sample_videos(config, ...)` has the signature of `training.setup.sample_videos`; a job picks it
when `config.eval.sampler == "causal"` (or `config.sample.sampler`), with `eval.solver` / `sample.solver`
`eval.noisy_context` / `sample.noisy_context` and `eval.average_velocity` (TF-MeanFlow students), the block
pattern from `config.causal`.
This module also owns the condition helpers shared with the causal recipes (PER_FRAME_CONDITIONS,
`slice_cond`, `guided_call`), since recipes sit above inference.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rcm_jax.diffusion import flow, samplers
from rcm_jax.models import masks

# Condition keys that carry a frame axis (axis 1): packed / sliced with the video.
PER_FRAME_CONDITIONS = ("actions", "y")
SOLVERS = ("consistency", "euler")


def slice_cond(cond: dict, f0: int, f1: int) -> dict:
  """Per-frame conditions restricted to frames [f0, f1); others unchanged."""
  return {k: v[:, f0:f1] if k in PER_FRAME_CONDITIONS else v for k, v in cond.items()}


def concat_batch(a: dict, b: dict) -> dict:
  return {k: jnp.concatenate([jnp.asarray(a[k]), jnp.asarray(b[k])]) for k in a}


def guided_call(fn: Callable, cond: dict, null: dict, scale: float, *args):
  """CFG of `fn(*args, cond)` in one batched pass over [cond | null]; args are batch-major arrays."""
  if scale == 1.0:
    return fn(*args, cond)
  b = jax.tree.leaves(args)[0].shape[0]
  both = jax.tree.map(lambda a: jnp.concatenate([a, a]), args)
  v = fn(*both, concat_batch(cond, null))
  return samplers.cfg(v[:b], v[b:], scale)


def mean_flow_apply(model, params, x, t, r, **kwargs):
  """Average velocity u(x, r, t) of a TF-MeanFlow model (recipes/tf_meanflow.py); t, r: [B, T].

  model.apply with the per-frame time embedding E(1000 t) + E(1000 (t - r)) - E(0), E the model's own
  `condition_embedder.embed_time`, injected by a flax method interceptor (no new params; r = t gives v(x, t)).
  """
  t, r = jnp.asarray(t), jnp.asarray(r)
  gap = 1000.0 * (t - r).astype(jnp.promote_types(t.dtype, jnp.float32))   # at least fp32, as the model's 1000 t
  calls = []

  def interceptor(next_fun, args, kw, context):
    if context.method_name != "embed_time":
      return next_fun(*args, **kw)
    calls.append(1)
    (ts,) = args
    return next_fun(ts) + next_fun(gap) - next_fun(jnp.zeros_like(gap))

  with nn.intercept_methods(interceptor):
    out = model.apply(params, x, t, **kwargs)
  if not calls:
    raise RuntimeError("mean_flow_apply: the model no longer calls condition_embedder.embed_time; update it to "
                       "the model's time path.")
  return out


def chunk_times(solver: str, num_steps: int, shift: float, first_chunk: bool,
                first_chunk_steps: int = 4) -> np.ndarray:
  if solver == "consistency":
    return np.asarray(samplers.few_step_times(num_steps, first_chunk=first_chunk,
                                              first_chunk_steps=first_chunk_steps), np.float32)
  if solver == "euler":
    if num_steps < 1:
      raise ValueError(f"num_steps must be >= 1, got {num_steps} (config key eval.steps / sample.steps).")
    return np.asarray(flow.shift(np.linspace(1.0, 0.0, num_steps + 1), shift), np.float32)   # = time_grid
  raise ValueError(f"Unknown causal solver {solver!r} (config key eval.solver / sample.solver); choose one of "
                   f"{SOLVERS}.")


@partial(jax.jit, static_argnames=("model", "pattern", "num_steps", "cfg_scale", "solver", "shift",
                                   "noisy_context", "average_velocity"))
def sample(model, params, noise, cond: dict, null: dict, *, pattern, num_steps: int, cfg_scale: float,
           solver: str = "consistency", shift: float = 1.0, noisy_context: bool = False,
           average_velocity: bool = False, rng=None):
  """noise: [B, T, H, W, C] -> samples [B, T, H, W, C], chunk by chunk.

  pattern: hashable, with first_chunk_frames, chunk_frames, local_blocks (None = all), sink_blocks
  (e.g. `rcm_jax.recipes.causal.BlockPattern`). rng: fresh noise of the consistency solver.
  average_velocity: a TF-MeanFlow model, called as u(x, 0, t) for the chunk (context frames keep r = t).
  """
  b, nf, h, w, _ = noise.shape
  _, ph, pw = model.config.patch_size
  tpf = (h // ph) * (w // pw)
  blocks = dict(first_chunk_frames=pattern.first_chunk_frames, chunk_frames=pattern.chunk_frames)
  window = dict(local_blocks=pattern.local_blocks, sink_blocks=pattern.sink_blocks)
  rng = jax.random.key(0) if rng is None else rng
  ctx_x = noise[:, :0]                         # [B, f0, H, W, C] context frames
  ctx_t = jnp.zeros((b, 0), jnp.float32)       # [B, f0] their times
  outs = []
  for i, (f0, f1) in enumerate(masks.block_frame_ranges(nf, **blocks)):
    mask = masks.block_causal(f1, tpf, **blocks, **window)
    if average_velocity:   # r = 0 on the chunk, r = t (plain velocity) on the context
      fn = lambda xf, tf, c, mask=mask, f0=f0: mean_flow_apply(
          model, params, xf, tf, tf.at[:, f0:].set(0.0), **c, mask=mask)[:, f0:]
    else:
      fn = lambda xf, tf, c, mask=mask, f0=f0: model.apply(params, xf, tf, **c, mask=mask)[:, f0:]
    c_i, n_i = slice_cond(cond, 0, f1), slice_cond(null, 0, f1)
    times = jnp.asarray(chunk_times(solver, num_steps, shift, i == 0))
    n = f1 - f0

    def step(carry, tt, ctx_x=ctx_x, ctx_t=ctx_t, fn=fn, c_i=c_i, n_i=n_i, n=n):
      x, _, _, key = carry
      t, t_next = tt
      xf = jnp.concatenate([ctx_x, x], axis=1)
      tf = jnp.concatenate([ctx_t, jnp.full((b, n), t, jnp.float32)], axis=1)
      v = guided_call(fn, c_i, n_i, cfg_scale, xf, tf)
      key, sub = jax.random.split(key)
      if solver == "consistency":
        x_next = samplers.consistency_step(x, t, t_next, v, jax.random.normal(sub, x.shape, jnp.float32))
      else:
        x_next = samplers.euler_step(x, t, t_next, v)
      return (x_next, x, t, key), None

    x = noise[:, f0:f1].astype(jnp.float32) * times[0]
    init = (x, x, times[0], jax.random.fold_in(rng, i))
    (x, x_last, t_last, _), _ = jax.lax.scan(step, init, (times[:-1], times[1:]))
    outs.append(x)
    if noisy_context:
      ctx_x = jnp.concatenate([ctx_x, x_last], axis=1)
      ctx_t = jnp.concatenate([ctx_t, jnp.full((b, n), t_last, jnp.float32)], axis=1)
    else:
      ctx_x = jnp.concatenate([ctx_x, x], axis=1)
      ctx_t = jnp.concatenate([ctx_t, jnp.zeros((b, n), jnp.float32)], axis=1)
  return jnp.concatenate(outs, axis=1)


class _Pattern:
  """Hashable block pattern read from config.causal (the recipes validate it at training time)."""

  def __init__(self, c):
    self.first_chunk_frames = int(c.get("first_chunk_frames", 1))
    self.chunk_frames = int(c.get("chunk_frames", 1))
    self.local_blocks = int(c.get("local_blocks", 0)) or None
    self.sink_blocks = int(c.get("sink_blocks", 0))
    self._key = (self.first_chunk_frames, self.chunk_frames, self.local_blocks, self.sink_blocks)

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _Pattern) and self._key == other._key


def sample_videos(config, model, params, batch: dict, rng, *, num: int, num_steps: int | None = None,
                  cfg_scale: float | None = None, job: str = "eval"):
  """Causal samples for the first `num` conditions of `batch`: [num, T, H, W, C] numpy.

  Same signature as `training.setup.sample_videos` (plus `job`, the config section: "eval" or "sample").
  """
  section = config[job]
  take = lambda tree: jax.tree.map(lambda x: jnp.asarray(x[:num]), tree)
  r_noise, r_sample = jax.random.split(rng)
  noise = jax.random.normal(r_noise, batch["video"][:num].shape, jnp.float32)
  out = sample(model, params, noise, take(batch["cond"]), take(batch["null"]),
               pattern=_Pattern(config.get("causal") or {}),
               num_steps=int(num_steps or config.sample.steps),
               cfg_scale=float(section.cfg_scale if cfg_scale is None else cfg_scale),
               solver=section.get("solver", "consistency"), shift=float(config.sample.shift),
               noisy_context=bool(section.get("noisy_context", False)),
               average_velocity=bool(section.get("average_velocity", False)), rng=r_sample)
  return np.asarray(out)
