"""The streaming `sample` job for causal students, and what it shares with the play server.

Owns: loading a causal stage for streaming (`load_causal`: refuses bidirectional checkpoints), the stream's
config keys (`stream_settings`), action parsing (`parse_actions`), and `sample_stream`: the `sample` job when
`sample.sampler == "rollout"`, which writes every chunk as a PNG as soon as it is generated
(<workdir>/samples/stream/batchBB_chunkCCCC.png: rows = videos, columns = the chunk frames), then the GIF/MP4 of
the whole videos, samples.npz and metrics.json (per-chunk latency, frames per second, compiles).

Config keys (section `sample`): sampler="rollout", steps (1/2/4 consistency or Euler), first_chunk_steps
(consistency: the first chunk's steps, the paper's 4; 1 or 2 cut the first-chunk latency), solver, noisy_context,
cache_keys, cache_frames, num_frames (0 = the world's length; more streams through the rolling window of
causal.local_blocks / causal.sink_blocks), kv_cache_dtype (float32 | bfloat16 | int8), no_kv_cache
(recompute the context every chunk; flag --no_kv_cache), actions (action-conditioned worlds: a comma list of
names or indices for every frame, the last repeated; "" = the held-out actions, which must cover num_frames).
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from rcm_jax.data import worlds as worlds_lib
from rcm_jax.errors import UserError
from rcm_jax.inference import rollout
from rcm_jax.inference.causal_sample import PER_FRAME_CONDITIONS, _Pattern

# Recipes that train a bidirectional (full-attention) model: not streamable.
BIDIRECTIONAL_RECIPES = ("rf", "scm_trigflow", "rcm_bidirectional")


class StreamConfigError(UserError):
  pass


def check_causal_checkpoint(stage_dir: str, flag: str) -> None:
  """A stage trained by a bidirectional recipe cannot stream: one message naming `flag`."""
  path = os.path.join(stage_dir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    recipe = json.load(f).get("recipe", "")
  if recipe in BIDIRECTIONAL_RECIPES:
    raise StreamConfigError(
        f"{flag}={stage_dir} is a bidirectional model (recipe {recipe!r}): streaming needs a causal student "
        "(a tf, tf_scm, tf_dcm, tf_meanflow or sf_dmd stage); point it at one of those.")


def stream_settings(config, section: str = "sample") -> dict:
  """The rollout keyword arguments a config's section asks for (checked)."""
  s = config[section]
  dtype = s.get("kv_cache_dtype", "float32")
  if dtype not in rollout.KV_CACHE_DTYPES:
    raise StreamConfigError(f"{section}.kv_cache_dtype={dtype!r}: choose one of {rollout.KV_CACHE_DTYPES}.")
  return dict(solver=s.get("solver", "consistency"), cfg_scale=float(s.cfg_scale),
              noisy_context=bool(s.get("noisy_context", False)), cache_keys=s.get("cache_keys", "post_rope"),
              kv_cache=not bool(s.get("no_kv_cache", False)), kv_cache_dtype=dtype,
              runtime_masks=bool(s.get("runtime_masks", False)))


def make_stream_plan(config, num_frames: int, section: str = "sample", *, key: str = "sample.num_frames",
                     round_down: bool = False, window: dict | None = None):
  """(plan, schedules) of a stream of `num_frames` under config.causal's block pattern (window: overrides of
  local_blocks / sink_blocks). A count that is not first_chunk_frames + k * chunk_frames is rounded down
  (round_down) or refused, naming `key`."""
  pattern = _Pattern({**dict(config.get("causal") or {}), **(window or {})})
  first, chunk = pattern.first_chunk_frames, pattern.chunk_frames
  fits = first + max(0, (num_frames - first) // chunk) * chunk
  if round_down and num_frames >= first:
    num_frames = fits
  elif num_frames < first or fits != num_frames:
    raise StreamConfigError(f"{key}={num_frames}: the chunk pattern (causal.first_chunk_frames={first}, "
                            f"causal.chunk_frames={chunk}) needs {first} + k * {chunk} frames, e.g. "
                            f"{max(fits, first)} or {max(fits, first - chunk) + chunk}.")
  plan = rollout.make_plan(pattern, num_frames, int(config[section].get("cache_frames", 0)),
                           key=f"{section}.cache_frames")
  schedules = rollout.schedules_for(plan, config[section].get("solver", "consistency"), int(config[section].steps),
                                    float(config.sample.shift), int(config[section].get("first_chunk_steps", 4)))
  return plan, schedules


def parse_actions(spec: str, num_frames: int, key: str = "sample.actions") -> np.ndarray:
  """'right,right,up' or '4,4,1' -> int32[num_frames] (the last action repeated)."""
  out = []
  for tok in [t.strip() for t in str(spec).split(",") if t.strip()]:
    if tok in worlds_lib.ACTION_NAMES:
      out.append(worlds_lib.ACTION_NAMES.index(tok))
    elif tok.isdigit() and int(tok) < worlds_lib.NUM_ACTIONS:
      out.append(int(tok))
    else:
      raise StreamConfigError(f"{key}={spec!r}: {tok!r} is not an action; use {worlds_lib.ACTION_NAMES} or "
                              f"0..{worlds_lib.NUM_ACTIONS - 1}, comma separated.")
  if not out:
    raise StreamConfigError(f"{key} is empty; give at least one action.")
  out = out[:num_frames] + [out[-1]] * max(0, num_frames - len(out))
  return np.asarray(out, np.int32)


def extend_conditions(model, cond: dict, num_frames: int, actions: str, key: str = "sample.actions", *,
                      null: bool = False) -> dict:
  """Per-frame conditions [B, T_data, ...] -> [B, num_frames, ...]. Actions: `actions` (if given) replace them;
  else the known ones must cover num_frames (null=True: CFG's null actions, repeated). Other per-frame keys
  (y: the first frame on frame 0) are zero-padded."""
  out = {k: np.asarray(v) for k, v in cond.items()}
  b = next(iter(out.values())).shape[0]
  if model.config.num_actions > 0 and not null:
    if actions:
      out["actions"] = np.broadcast_to(parse_actions(actions, num_frames, key), (b, num_frames))
    elif "actions" not in out or out["actions"].shape[1] < num_frames:
      have = out["actions"].shape[1] if "actions" in out else 0
      raise StreamConfigError(
          f"the model is action-conditioned but only {have} frames of actions are known for {num_frames} frames; "
          f"set {key} (e.g. {key}=right,right,up,stay) or generate at most {have} frames.")
  for k in PER_FRAME_CONDITIONS:
    if k in out and out[k].shape[1] < num_frames:
      v = out[k]
      mode = "edge" if k == "actions" else "constant"
      out[k] = np.pad(v, [(0, 0), (0, num_frames - v.shape[1])] + [(0, 0)] * (v.ndim - 2), mode=mode)
    if k in out:
      out[k] = out[k][:, :num_frames]
  return out


def load_causal(config, checkpoint_dir: str, flag: str):
  """(world, model, params) of a causal stage for streaming; a bidirectional stage raises (naming `flag`)."""
  from rcm_jax.training import checkpoint
  from rcm_jax.training import setup as setup_lib
  check_causal_checkpoint(checkpoint_dir, flag)
  setup_lib.validate(config)
  world = setup_lib.make_world(config)
  params, _ = checkpoint.load_params(checkpoint_dir, use_ema=config.sample.use_ema)
  return world, setup_lib.make_model(config, world), params


def _write_png(path: str, chunk: np.ndarray) -> None:
  """chunk [B, n, H, W, C] -> one PNG, rows = videos, columns = frames (1-pixel gaps)."""
  import imageio.v3 as iio
  from rcm_jax.training.writer import to_uint8
  v = to_uint8(chunk)
  b, n, h, w, c = v.shape
  grid = np.full((b * (h + 1) - 1, n * (w + 1) - 1, c), 255, np.uint8)
  for i in range(b):
    for j in range(n):
      grid[i * (h + 1):i * (h + 1) + h, j * (w + 1):j * (w + 1) + w] = v[i, j]
  iio.imwrite(path, grid.repeat(4, 0).repeat(4, 1))


def sample_stream(config, workdir: str, prepared) -> dict:
  """The streaming sample job (see the module docstring). prepared = jobs._prepare_job's tuple."""
  from rcm_jax.training.writer import write_metrics, write_video
  world, model, params, src, raw, batch = prepared
  check_causal_checkpoint(src, "sample.checkpoint")
  s = config.sample
  data_frames = batch["video"].shape[1]
  num_frames = int(s.get("num_frames", 0)) or data_frames
  settings = stream_settings(config)
  plan, schedules = make_stream_plan(config, num_frames)
  cond = extend_conditions(model, batch["cond"], num_frames, s.get("actions", ""))
  null = extend_conditions(model, batch["null"], num_frames, "", null=True) if settings["cfg_scale"] != 1.0 else None
  out_dir = os.path.join(workdir, "samples", "stream")
  os.makedirs(out_dir, exist_ok=True)
  videos, chunks = [], []
  rng = jax.random.key(config.seed + 1)
  n = batch["video"].shape[0]
  for start in range(0, n, s.batch_size):
    take = lambda tree: jax.tree.map(lambda x: jnp.asarray(x[start:start + s.batch_size]), tree)
    c_b = take(cond)
    b = next(iter(c_b.values())).shape[0]
    r_noise, r_sample = jax.random.split(jax.random.fold_in(rng, start))
    noise = jax.random.normal(r_noise, (b, num_frames) + batch["video"].shape[2:], jnp.float32)
    parts = []
    for ch in rollout.stream(model, params, noise, c_b, None if null is None else take(null), plan=plan,
                             schedules=schedules, rng=r_sample, **settings):
      frames = np.asarray(ch.video)
      parts.append(frames)
      _write_png(os.path.join(out_dir, f"batch{start // s.batch_size:02d}_chunk{ch.index:04d}.png"), frames)
      chunks.append(dict(batch=start // s.batch_size, chunk=ch.index, frames=[ch.f0, ch.f1], videos=b,
                         seconds=ch.seconds, compiled=ch.compiled))
      logging.warning("stream: chunk %d (frames %d-%d) in %.3f s%s", ch.index, ch.f0, ch.f1 - 1, ch.seconds,
                      " (compiled)" if ch.compiled else "")
    videos.append(np.concatenate(parts, axis=1))
  videos = np.concatenate(videos)
  np.savez_compressed(os.path.join(workdir, "samples", "samples.npz"), videos=videos,
                      **{k: v for k, v in raw.items() if k != "video"})
  tag = f"stream_{s.steps}step_{num_frames}f"
  gif = write_video(os.path.join(workdir, "samples", f"{tag}.gif"), videos[:16])
  mp4 = write_video(os.path.join(workdir, "samples", f"{tag}.mp4"), videos[:16])
  warm = [c["seconds"] for c in chunks if not c["compiled"]]
  frames_warm = sum((c["frames"][1] - c["frames"][0]) * c["videos"] for c in chunks if not c["compiled"])
  result = {"source": src, "num_videos": int(videos.shape[0]), "num_frames": num_frames, "steps": s.steps,
            "kv_cache": settings["kv_cache"], "kv_cache_dtype": settings["kv_cache_dtype"],
            "noisy_context": settings["noisy_context"], "cache_frames": plan.cache_frames,
            "chunks": chunks, "compiles": sum(c["compiled"] for c in chunks),
            "fps_without_compiles": (frames_warm / sum(warm)) if warm else None,
            "gif": gif, "mp4": mp4, "chunk_pngs": out_dir, "xla_flags": os.environ.get("XLA_FLAGS", "")}
  write_metrics(workdir, result)
  return result
