"""Toy-world datasets on disk: ArrayRecord shards plus a JSON manifest, written once and never overwritten.

This file owns the on-disk format and its checks:
  <root>/<world>_<split>/manifest.json      world name, resolved world config, seed, split, counts, shards
  <root>/<world>_<split>/shard-00000-of-000NN.array_record   one serialised example per record

One example = `np.savez` bytes of a dict of arrays without the batch axis: `video` as uint8 [T, H, W, C]
(frames are on the 8-bit grid, see worlds.quantize, so this is lossless) and each metadata key as generated.
Teacher samples (training/generate.py) are not on that grid: they are stored as float16 or float32
(`encode_example(..., video_dtype=)`). `decode_example` turns either back into float32 (uint8 -> [-1, 1]).

`ensure_dataset` writes into a temporary directory and renames it into place, so a crashed or concurrent
writer never leaves a half-written dataset under the final name; an existing dataset is reused only if its
manifest matches the request, otherwise a `DatasetMismatchError` names the differing key.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from rcm_jax.data import worlds as worlds_lib

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: cheap random access for the shuffled sampler


class DatasetError(RuntimeError):
  """A dataset directory is unusable (missing or corrupt shard, unreadable manifest)."""


class DatasetMismatchError(ValueError):
  """The dataset on disk was written for a different request."""


# ----------------------------------------------------------------------------------------------------------
# Serialisation
# ----------------------------------------------------------------------------------------------------------


VIDEO_DTYPES = ("uint8", "float16", "float32")


def encode_example(example: Mapping[str, np.ndarray], *, video_dtype: str = "uint8") -> bytes:
  """uint8 quantizes to the 8-bit grid (lossless for world frames); float16/float32 store the values as cast."""
  if video_dtype not in VIDEO_DTYPES:
    raise ValueError(f"video_dtype={video_dtype!r}: choose one of {VIDEO_DTYPES}")
  arrays = {k: np.asarray(v) for k, v in example.items()}
  if video_dtype == "uint8":
    arrays["video"] = worlds_lib.quantize(arrays["video"])
  else:
    arrays["video"] = arrays["video"].astype(video_dtype)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def decode_example(data: bytes) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(data), allow_pickle=False) as z:
    out = {k: z[k] for k in z.files}
  if out["video"].dtype == np.uint8:
    out["video"] = worlds_lib.dequantize(out["video"])
  else:
    out["video"] = out["video"].astype(np.float32)
  return out


# ----------------------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------------------


def dataset_dir(root: str | os.PathLike, world_name: str, split: str) -> str:
  return os.path.join(os.fspath(root), f"{world_name}_{worlds_lib.canonical_split(split)}")


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
  mpath = os.path.join(os.fspath(path), MANIFEST)
  if not os.path.exists(mpath):
    raise DatasetError(f"no {MANIFEST} in {path}: not a dataset directory (write it with ensure_dataset)")
  try:
    with open(mpath) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise DatasetError(f"unreadable manifest {mpath}: {e}") from e


def _request(world, num_videos: int, seed: int, split: str) -> dict[str, Any]:
  return {
      "format_version": FORMAT_VERSION,
      "world": world.name,
      "config": worlds_lib.world_config_dict(world),
      "seed": int(seed),
      "split": split,
      "num_videos": int(num_videos),
  }


def first_difference(existing: Mapping[str, Any], requested: Mapping[str, Any], prefix: str = "") -> str | None:
  for key in requested:
    a, b = existing.get(key, "<missing>"), requested[key]
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      diff = first_difference(a, b, f"{prefix}{key}.")
      if diff:
        return diff
      extra = sorted(set(a) - set(b))
      if extra:
        return f"{prefix}{key}.{extra[0]}: on disk {a[extra[0]]!r}, not in the request"
    elif a != b:
      return f"{prefix}{key}: on disk {a!r}, requested {b!r}"
  return None


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def write_dataset(world, num_videos: int, seed: int, split: str, path: str | os.PathLike, *,
                  shard_size: int = 256, chunk: int = 64, progress: bool = True) -> str:
  """Generate `num_videos` videos and write them as shards + manifest into the new directory `path`."""
  from array_record.python.array_record_module import ArrayRecordWriter

  path = os.fspath(path)
  if num_videos < 1:
    raise ValueError(f"num_videos must be >= 1, got {num_videos}")
  if os.path.exists(path):
    raise FileExistsError(f"{path} exists; refusing to overwrite a dataset")
  num_shards = max(1, -(-num_videos // shard_size))
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  try:
    shards = []
    bar = tqdm(total=num_videos, desc=f"writing {os.path.basename(path)}", unit="video", disable=not progress)
    for s in range(num_shards):
      name = f"shard-{s:05d}-of-{num_shards:05d}.array_record"
      lo, hi = s * shard_size, min(num_videos, (s + 1) * shard_size)
      writer = ArrayRecordWriter(os.path.join(tmp, name), WRITER_OPTIONS)
      for c0 in range(lo, hi, chunk):
        batch = world.generate(min(chunk, hi - c0), seed, split, start=c0)
        for i in range(len(batch["video"])):
          writer.write(encode_example({k: v[i] for k, v in batch.items()}))
        bar.update(len(batch["video"]))
      writer.close()
      shards.append({"file": name, "num_records": hi - lo, "bytes": os.path.getsize(os.path.join(tmp, name))})
    bar.close()
    manifest = dict(_request(world, num_videos, seed, split), shards=shards,
                    keys=sorted(batch.keys()))
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2, sort_keys=True)
    try:
      os.rename(tmp, path)
    except OSError:
      if not os.path.exists(os.path.join(path, MANIFEST)):
        raise
      # Another process finished the same dataset first; ensure_dataset checks that it matches.
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def ensure_dataset(world_name: str, world_config: Any, num_videos: int, seed: int, split: str,
                   root: str | os.PathLike, *, shard_size: int = 256, progress: bool = True) -> str:
  """Path of `<root>/<world>_<split>`, writing it if missing and checking it against the request if present.

  Raises DatasetMismatchError naming the first differing key (e.g. `config.size`) when the directory holds
  data written for another request; nothing is ever overwritten.
  """
  world = worlds_lib.get_world(world_name, world_config)
  split = worlds_lib.canonical_split(split)
  path = dataset_dir(root, world_name, split)
  if os.path.exists(path):
    if not os.path.exists(os.path.join(path, MANIFEST)):
      raise DatasetError(f"{path} exists but has no {MANIFEST}; it is not a dataset this code wrote. "
                         "Move it away or choose another data root.")
  else:
    os.makedirs(os.fspath(root), exist_ok=True)
    write_dataset(world, num_videos, seed, split, path, shard_size=shard_size, progress=progress)
  diff = first_difference(read_manifest(path), _request(world, num_videos, seed, split))
  if diff:
    raise DatasetMismatchError(
        f"dataset at {path} was written for a different request ({diff}). Use another data root or "
        "workdir, or delete that directory to regenerate it; it is never overwritten.")
  validate_shards(path)
  return path


# ----------------------------------------------------------------------------------------------------------
# Reading checks
# ----------------------------------------------------------------------------------------------------------


def validate_shards(path: str | os.PathLike) -> list[str]:
  """Check every shard of the manifest exists with its recorded size and record count; return their paths."""
  from array_record.python.array_record_module import ArrayRecordReader

  path = os.fspath(path)
  manifest = read_manifest(path)
  files = []
  for shard in manifest["shards"]:
    f = os.path.join(path, shard["file"])
    if not os.path.exists(f):
      raise DatasetError(f"missing shard {f} (listed in {os.path.join(path, MANIFEST)}); "
                         "delete the dataset directory to regenerate it")
    size = os.path.getsize(f)
    if size != shard["bytes"]:
      raise DatasetError(f"corrupt shard {f}: {size} bytes on disk, {shard['bytes']} in the manifest "
                         "(truncated or rewritten); delete the dataset directory to regenerate it")
    try:
      reader = ArrayRecordReader(f)
      n = reader.num_records()
      reader.close()
    except Exception as e:  # the C++ reader raises assorted types for damaged files
      raise DatasetError(f"corrupt shard {f}: {e}") from e
    if n != shard["num_records"]:
      raise DatasetError(f"corrupt shard {f}: {n} records, {shard['num_records']} in the manifest")
    files.append(f)
  return files
