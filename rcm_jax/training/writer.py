"""Logging: tensorboardX scalars and videos, a per-step JSON-lines loss log, and metrics.json.

Only process 0 writes. Videos go to TensorBoard as animated GIF image summaries (what its video
summary is), encoded here with imageio so no moviepy is needed.
"""
from __future__ import annotations

import io
import json
import os
import time

import imageio.v3 as iio
import jax
import numpy as np


def to_uint8(video):
  """[..., H, W, C] in [-1, 1] -> uint8 RGB (grey channels repeated)."""
  v = np.clip((np.asarray(video, np.float32) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
  if v.shape[-1] == 1:
    v = np.repeat(v, 3, axis=-1)
  return v


def video_grid(videos, ncol: int = 8):
  """[N, T, H, W, C] -> [T, rows*H, ncol*W, 3] uint8 with 1-pixel gaps."""
  v = to_uint8(videos)
  n, t, h, w, c = v.shape
  ncol = min(ncol, n)
  nrow = -(-n // ncol)
  grid = np.full((t, nrow * (h + 1) - 1, ncol * (w + 1) - 1, c), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, ncol)
    grid[:, r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = v[i]
  return grid


def write_video(path: str, videos, *, fps: int = 4, scale: int = 4) -> str:
  """Write a grid of videos as .gif or .mp4 (by extension), upscaled by `scale` (nearest)."""
  frames = video_grid(videos)
  frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  if path.endswith(".mp4"):
    iio.imwrite(path, frames, fps=fps, codec="libx264", macro_block_size=1)
  else:
    iio.imwrite(path, frames, duration=int(1000 / fps), loop=0)
  return path


class Writer:
  def __init__(self, logdir: str):
    self.enabled = jax.process_index() == 0
    self.logdir = logdir
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter
      os.makedirs(logdir, exist_ok=True)
      self._tb = SummaryWriter(os.path.join(logdir, "tb"))

  def scalars(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    for k, v in metrics.items():
      self._tb.add_scalar(k, float(v), step)
    with open(os.path.join(self.logdir, "losses.jsonl"), "a") as f:
      f.write(json.dumps({"step": int(step), "wall": round(time.time(), 3),   # wall: seconds per step
                          **{k: float(v) for k, v in metrics.items()}}) + "\n")

  def video(self, step: int, tag: str, videos, fps: int = 4) -> None:
    if not self.enabled:
      return
    from tensorboardX.proto.summary_pb2 import Summary
    frames = video_grid(videos)
    buf = io.BytesIO()
    iio.imwrite(buf, frames, extension=".gif", duration=int(1000 / fps), loop=0)
    img = Summary.Image(height=frames.shape[1], width=frames.shape[2], colorspace=3,
                        encoded_image_string=buf.getvalue())
    self._tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=img)]), step)

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_losses(logdir: str) -> dict[int, dict]:
  """The per-step log; a step logged twice (recomputed after a resume) keeps its last record."""
  out = {}
  path = os.path.join(logdir, "losses.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          rec = json.loads(line)
          out[rec["step"]] = rec
  return out


def write_metrics(logdir: str, metrics: dict) -> str:
  path = os.path.join(logdir, "metrics.json")
  if jax.process_index() == 0:
    os.makedirs(logdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(metrics, f, indent=2, sort_keys=True, default=float)
    os.replace(path + ".tmp", path)
  return path
