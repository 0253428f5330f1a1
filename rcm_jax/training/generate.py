"""The generate job: teacher samples for the real train-split conditions, written as a resumable dataset.

This file owns the teacher dataset on disk (read for training with data.source="teacher"):
  <data root>/<world>_teacher_<name>/request.json    what is being generated; written first, checked on resume
  .../shard-SSSSS-of-NNNNN.array_record               shard s = examples [s * S, (s + 1) * S)
  .../manifest.json                                   request + shards + keys; written last, by process 0
Example i is the teacher's sample for the conditions of real train example i (same labels, actions, first
frame, ...), stored with every metadata key of that example plus `teacher_step`, the video as float16/32.

A shard is written to a temporary file and renamed, and its noise is fold_in(key(generate.seed), s), so a
killed run resumes at the first missing shard without rewriting finished ones, and any split of the shards
over processes (process p writes s = p, p + P, ...) gives the same dataset.
"""
from __future__ import annotations

import json
import math
import os
import time
import uuid

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from rcm_jax.data import pipeline as pipeline_lib
from rcm_jax.data import records
from rcm_jax.data import worlds as worlds_lib
from rcm_jax.errors import UserError
from rcm_jax.training import checkpoint, jobs
from rcm_jax.training import setup as setup_lib
from rcm_jax.training.writer import write_metrics

REQUEST = "request.json"
VIDEO_DTYPES = ("float16", "float32")


def _shard_name(s: int, num_shards: int) -> str:
  return f"shard-{s:05d}-of-{num_shards:05d}.array_record"


def _stack(examples: list[dict]) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _check(config) -> int:
  """Checks of the generate section that need no compute; returns the number of videos to generate."""
  g = config.generate
  for key in ("steps", "shard_size", "batch_size"):
    if g[key] < 1:
      raise UserError(f"generate.{key} must be >= 1, got {g[key]}.")
  if g.cfg_scale < 1.0:
    raise UserError(f"generate.cfg_scale={g.cfg_scale}: use >= 1 (1 = no guidance; the paper's teachers use 3-5).")
  if g.video_dtype not in VIDEO_DTYPES:
    raise UserError(f"generate.video_dtype={g.video_dtype!r}: choose one of {VIDEO_DTYPES} (teacher samples are "
                    "not on the 8-bit grid, so uint8 would round them).")
  if os.sep in g.name:
    raise UserError(f"generate.name={g.name!r}: a directory name, not a path (the dataset goes under the data root).")
  num_real = config.data.num_train_videos
  n = g.num_videos or num_real
  if not 1 <= n <= num_real:
    raise UserError(f"generate.num_videos={g.num_videos}: the conditions come from the real train split, which "
                    f"has {num_real} videos; use 0 (all) or up to {num_real}, or raise data.num_train_videos.")
  return n


def _request(config, world, src: str, step: int, num_videos: int) -> dict:
  g = config.generate
  return {
      "format_version": records.FORMAT_VERSION,
      "kind": "teacher",
      "world": config.world,
      "config": worlds_lib.world_config_dict(world),
      "conditions": {"split": "train", "seed": int(config.data.seed)},
      "teacher_step": int(step),
      "generate": {"checkpoint": os.path.abspath(src), "use_ema": bool(g.use_ema), "steps": int(g.steps),
                   "cfg_scale": float(g.cfg_scale), "shift": float(g.shift), "sampler": g.sampler,
                   "seed": int(g.seed), "num_videos": int(num_videos), "shard_size": int(g.shard_size),
                   "video_dtype": g.video_dtype},
  }


def _write_json(path: str, obj: dict) -> None:
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _claim(path: str, request: dict) -> bool:
  """Create the dataset dir or check that it holds this request; True if it is already finished."""
  os.makedirs(path, exist_ok=True)
  finished = os.path.exists(os.path.join(path, records.MANIFEST))
  rpath = os.path.join(path, records.MANIFEST if finished else REQUEST)
  if not os.path.exists(rpath):
    _write_json(rpath, request)
  with open(rpath) as f:
    diff = records.first_difference(json.load(f), request)
  if diff:
    raise records.DatasetMismatchError(
        f"teacher dataset at {path} was generated for another request ({diff}). Set generate.name to write a "
        "separate dataset, or delete that directory to regenerate it; finished shards are never overwritten.")
  return finished


def _sample_shard(config, model, params, sample_fn, world, raw: dict, rng) -> np.ndarray:
  """raw: real examples {video: [n, T, H, W, C], meta...} -> teacher samples [n, T, H, W, C] for their conditions."""
  g = config.generate
  batch = setup_lib.prepare(world, raw)
  n, out = raw["video"].shape[0], []
  for c0 in range(0, n, g.batch_size):
    part = jax.tree.map(lambda x: x[c0:c0 + g.batch_size], batch)
    out.append(sample_fn(config, model, params, part, jax.random.fold_in(rng, c0), num=part["video"].shape[0],
                         num_steps=g.steps, cfg_scale=g.cfg_scale))
  return np.concatenate(out)


def _write_shard(path: str, name: str, raw: dict, videos: np.ndarray, step: int, video_dtype: str) -> None:
  from array_record.python.array_record_module import ArrayRecordWriter

  tmp = os.path.join(path, f".{name}.tmp-{uuid.uuid4().hex[:8]}")   # dot-named: never taken for a shard
  try:
    writer = ArrayRecordWriter(tmp, records.WRITER_OPTIONS)
    for i in range(videos.shape[0]):
      example = {k: v[i] for k, v in raw.items() if k != "video"}
      example.update(video=videos[i], teacher_step=np.int32(step))
      writer.write(records.encode_example(example, video_dtype=video_dtype))
    writer.close()
    os.rename(tmp, os.path.join(path, name))
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _write_manifest(path: str, request: dict, num_shards: int, num_videos: int, shard_size: int) -> None:
  from array_record.python.array_record_module import ArrayRecordReader

  reader = ArrayRecordReader(os.path.join(path, _shard_name(0, num_shards)))
  keys = sorted(records.decode_example(reader.read([0])[0]))
  reader.close()
  names = [_shard_name(s, num_shards) for s in range(num_shards)]
  shards = [{"file": f, "bytes": os.path.getsize(os.path.join(path, f)),
             "num_records": min(num_videos, (s + 1) * shard_size) - s * shard_size} for s, f in enumerate(names)]
  for leftover in [f for f in os.listdir(path) if ".tmp-" in f]:   # temporary files of killed runs
    os.remove(os.path.join(path, leftover))
  _write_json(os.path.join(path, records.MANIFEST), dict(request, shards=shards, keys=keys, num_videos=num_videos))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def generate(config, workdir: str, *, data_root: str | None = None, process_index: int | None = None,
             process_count: int | None = None, max_shards: int | None = None) -> dict:
  """Write teacher samples for the train-split conditions; resumes, and shards over processes.

  process_index / process_count default to JAX's; max_shards stops after that many new shards (a
  simulated interruption). The dataset is complete, with its manifest, once process 0 finds every shard.
  """
  t0 = time.time()
  setup_lib.validate(config)
  g = config.generate
  p = jax.process_index() if process_index is None else process_index
  num_p = jax.process_count() if process_count is None else process_count
  num_videos = _check(config)
  src = g.checkpoint or workdir
  try:
    params, step = checkpoint.load_params(src, use_ema=g.use_ema)
  except FileNotFoundError as e:
    raise UserError(f"generate.checkpoint={src!r}: {e}") from None
  world = setup_lib.make_world(config)
  data_root = data_root or os.path.join(workdir, "data")
  real = pipeline_lib.source(setup_lib.ensure_data(config, world, data_root, split="train", source="real"))
  logging.info("Generating from %s (step %d).", src, step)
  sample_cfg = ml_collections.ConfigDict(config.to_dict())
  sample_cfg.sample.shift = g.shift   # both samplers read the shift from the sample section
  sample_fn = jobs.sampler_for(sample_cfg, "generate")
  model = setup_lib.make_model(config, world)
  probe = setup_lib.prepare(world, _stack([real[0]]))
  abstract = jax.eval_shape(model.init, jax.random.key(0), probe["video"],
                            np.zeros(probe["video"].shape[:2], np.float32), **probe["cond"])
  try:
    setup_lib.check_params_match(params, abstract, src)
  except UserError as e:
    raise UserError(f"generate.checkpoint={src}: {e}") from None

  path = os.path.join(data_root, f"{config.world}_teacher_{g.name or os.path.basename(os.path.abspath(workdir))}")
  request = _request(config, world, src, step, num_videos)
  num_shards = math.ceil(num_videos / g.shard_size)
  written = []
  if not _claim(path, request):
    mine = list(range(p, num_shards, num_p))
    todo = [s for s in mine if not os.path.exists(os.path.join(path, _shard_name(s, num_shards)))]
    size = lambda s: min(num_videos, (s + 1) * g.shard_size) - s * g.shard_size
    bar = tqdm(total=sum(size(s) for s in mine), initial=sum(size(s) for s in mine if s not in todo),
               desc=f"generate {os.path.basename(path)}", unit="video", disable=p != 0)
    for s in todo[:max_shards]:
      lo, hi = s * g.shard_size, min(num_videos, (s + 1) * g.shard_size)
      raw = _stack([real[i] for i in range(lo, hi)])
      videos = _sample_shard(sample_cfg, model, params, sample_fn, world, raw,
                             jax.random.fold_in(jax.random.key(g.seed), s))
      _write_shard(path, _shard_name(s, num_shards), raw, videos, step, g.video_dtype)
      written.append(s)
      bar.update(hi - lo)
    bar.close()
    _barrier("generate_shards")
    missing = [s for s in range(num_shards) if not os.path.exists(os.path.join(path, _shard_name(s, num_shards)))]
    if p == 0 and not missing:
      _write_manifest(path, request, num_shards, num_videos, g.shard_size)
    _barrier("generate_manifest")
  complete = os.path.exists(os.path.join(path, records.MANIFEST))
  result = {"dataset": os.path.abspath(path), "complete": complete, "source": os.path.abspath(src),
            "teacher_step": int(step), "num_videos": num_videos, "num_shards": num_shards, "steps": g.steps,
            "cfg_scale": g.cfg_scale, "shards_written_this_run": written,
            "seconds_this_run": round(time.time() - t0, 2)}
  if complete:
    records.validate_shards(path)
    if p == 0:
      write_metrics(workdir, result)
  else:
    missing = [s for s in range(num_shards) if not os.path.exists(os.path.join(path, _shard_name(s, num_shards)))]
    result["missing_shards"] = missing
    print(f"generate: {len(missing)} of {num_shards} shards still missing in {path} (other processes' or an "
          "interrupted run's); run the same command to finish them.", flush=True)
  return result
