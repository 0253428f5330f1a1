"""grain input pipeline over the ArrayRecord shards written by records.py.

This file owns how examples become training batches:
  order   = MapDataset.range(N).shuffle(seed).repeat(num_epochs)      a permutation of the records per epoch
  global batch k = order[k * B : (k + 1) * B]                          (B = global batch size)
  process p of P takes global batch k's slice [p * B/P, (p + 1) * B/P)
so batch k is a pure function of (seed, k): a run resumed at step k with `start_step=k` sees exactly the
batches an unbroken run saw from step k on, and the P process slices of a step partition its global batch.
Records are read by random access (grain.MapDataset over grain's ArrayRecordDataSource) and only the
process's own slice is decoded. Shards are checked against the manifest before reading, so a missing or
truncated shard raises records.DatasetError naming the file.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import grain
import numpy as np
from tqdm.auto import tqdm

from rcm_jax.data import records


def source(path: str | os.PathLike) -> grain.MapDataset:
  """MapDataset of decoded examples (dicts of numpy arrays without a batch axis), in record order.

  A record that fails to read or decode raises records.DatasetError naming its shard.
  """
  files = records.validate_shards(path)
  src = grain.sources.ArrayRecordDataSource(files)
  ends = np.cumsum([s["num_records"] for s in records.read_manifest(path)["shards"]])

  def read(i: int) -> dict[str, np.ndarray]:
    try:
      return records.decode_example(src[i])
    except Exception as e:
      shard = files[int(np.searchsorted(ends, i, side="right"))]
      raise records.DatasetError(f"corrupt shard {shard}: record {i} unreadable ({type(e).__name__}: {e}); "
                                 "delete the dataset directory to regenerate it") from e

  return grain.MapDataset.range(len(src)).map(read)


def _collate(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def batch_dataset(path: str | os.PathLike, batch_size: int, seed: int, *, shuffle: bool = True,
                  process_index: int = 0, process_count: int = 1, drop_remainder: bool = True,
                  num_epochs: int | None = None) -> grain.MapDataset:
  """Random-access MapDataset whose item k is this process's slice of global batch k (dict of [B/P, ...])."""
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} must be divisible by process_count={process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  examples = source(path)
  n = len(examples)
  if n == 0:
    raise records.DatasetError(f"dataset {path} has no records")
  order = grain.MapDataset.range(n)
  if shuffle:
    order = order.shuffle(seed=seed)
  order = order.repeat(num_epochs)  # reseeds the shuffle every epoch
  total = len(order)
  if total >= sys.maxsize:
    num_batches = sys.maxsize
  else:
    num_batches = total // batch_size if drop_remainder else -(-total // batch_size)
  local = batch_size // process_count
  if num_epochs is not None and not drop_remainder and total % batch_size and process_count > 1:
    raise ValueError("a partial last batch cannot be split over processes; use drop_remainder=True")

  def get_batch(k: int) -> dict[str, np.ndarray]:
    lo = k * batch_size + process_index * local
    hi = min(lo + local, total)
    return _collate([examples[order[i]] for i in range(lo, hi)])

  return grain.MapDataset.range(num_batches).map(get_batch)


def make_batches(path: str | os.PathLike, batch_size: int, seed: int, *, shuffle: bool = True,
                 start_step: int = 0, process_index: int = 0, process_count: int = 1,
                 drop_remainder: bool = True, num_epochs: int | None = None,
                 num_threads: int = 2, prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """Iterator of this process's batches for steps start_step, start_step + 1, ...

  Each batch is a dict with `video` float32 [B/P, T, H, W, C] and the world's metadata keys. `batch_size` is
  the global batch size B; the iterator never ends unless num_epochs is set.
  """
  ds = batch_dataset(path, batch_size, seed, shuffle=shuffle, process_index=process_index,
                     process_count=process_count, drop_remainder=drop_remainder, num_epochs=num_epochs)
  ds = ds[start_step:]
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(read))


def load_all(path: str | os.PathLike, *, progress: bool = True) -> dict[str, np.ndarray]:
  """Every example in record order, stacked: `video` float32 [N, T, H, W, C] plus metadata [N, ...]."""
  examples = source(path)
  items = [examples[i] for i in tqdm(range(len(examples)), desc="loading", disable=not progress or len(examples) < 512)]
  if not items:
    raise records.DatasetError(f"dataset {path} has no records")
  return _collate(items)
