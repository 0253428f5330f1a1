"""Toy video worlds: moving digits and a camera pan over a photograph.

This file owns the two synthetic worlds, their configs, the registry (`WORLDS`, `get_world`) and the
conditioning the DiT receives (`model_inputs`, `null_inputs`). Nothing is downloaded: the digits are
scikit-learn's bundled 8x8 digits, the photographs are scikit-learn's bundled sample images.

Frames are used directly as latents: float32, channels-last, values on the 8-bit grid
`q / 127.5 - 1` (q in 0..255), so a video stored as uint8 decodes bit-exactly (see records.py).

Every video is a pure function of (seed, split, index): `generate(n, seed, split)` is a prefix of
`generate(n + k, seed, split)` and `generate(k, seed, split, start=i)` gives videos i..i+k-1, so data can be
written in chunks and any video regenerated alone.

Conventions shared with the model (`model(x, t, *, labels=None, actions=None, y=None)`):
  digits: `labels` int32 [B, max_digits], classes 0..9, `NULL_LABEL` = 10 marks an absent digit and is the
          unconditional label for classifier-free guidance.
  camera: `actions` int32 [B, T] in 0..4 (stay, up, down, left, right), `NULL_ACTION` = 5 for CFG;
          `y` float32 [B, T, H, W, C + 1]: the first frame on frame 0 and zeros elsewhere, the last channel a
          mask that is 1 on frame 0.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES
NUM_ACTIONS = 5
NULL_ACTION = NUM_ACTIONS
ACTION_NAMES = ("stay", "up", "down", "left", "right")
SPLITS = {"train": 0, "test": 1}  # "test" is the held-out split: evaluation conditions and the metric ceiling
SPLIT_ALIASES = {"eval": "test", "heldout": "test"}
_WORLD_IDS = {"moving_digits": 0, "camera_pan": 1}


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def _config_from(cls, config: Any):
  """A frozen config dataclass from None, a dataclass, a Mapping or an ml_collections.ConfigDict."""
  if config is None:
    return cls()
  if isinstance(config, cls):
    return config
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise TypeError(f"{cls.__name__}: expected a mapping or ConfigDict, got {type(config).__name__}")
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(config) - known)
  if unknown:
    raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; known keys: {sorted(known)}")
  return cls(**dict(config))


def canonical_split(split: str) -> str:
  """'train' or 'test' ('eval' and 'heldout' are accepted aliases of 'test')."""
  split = SPLIT_ALIASES.get(split, split)
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; known splits: {sorted(SPLITS)} (aliases {SPLIT_ALIASES})")
  return split


def _split_id(split: str) -> int:
  return SPLITS[canonical_split(split)]


def _video_rng(world: str, seed: int, split: str, index: int) -> np.random.Generator:
  if int(seed) < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  return np.random.default_rng((_WORLD_IDS[world], int(seed), _split_id(split), int(index)))


def quantize(x: np.ndarray) -> np.ndarray:
  """Values in [-1, 1] -> uint8 0..255 (round to nearest)."""
  return np.clip(np.rint((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def dequantize(q: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1]; the one place frame values are formed, so round trips are bit-exact."""
  return q.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _resample_matrix(n_out: int, n_in: int) -> np.ndarray:
  """[n_out, n_in] area-aware linear resampling (box filter when shrinking, bilinear when growing)."""
  scale = n_in / n_out
  if scale <= 1.0:  # upsampling: bilinear on pixel centres
    src = (np.arange(n_out) + 0.5) * scale - 0.5
    src = np.clip(src, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = src - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1 - w
    m[np.arange(n_out), hi] += w
    return m
  # downsampling: each output pixel averages the input interval it covers (exact box filter)
  edges = np.arange(n_out + 1) * scale
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    a, b = edges[i], edges[i + 1]
    for j in range(int(np.floor(a)), min(int(np.ceil(b)), n_in)):
      m[i, j] = min(b, j + 1) - max(a, j)
  return m / m.sum(axis=1, keepdims=True)


def _reflect(s: np.ndarray, length: float) -> np.ndarray:
  """Fold an unbounded coordinate into [0, length]: a point bouncing elastically between two walls."""
  if length <= 0:
    return np.zeros_like(s)
  u = np.mod(s, 2 * length)
  return np.where(u <= length, u, 2 * length - u)


# ----------------------------------------------------------------------------------------------------------
# Moving digits
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DigitsConfig:
  size: int = 32  # canvas height = width, pixels
  frames: int = 16
  channels: int = 1  # 1, or 3 (the grey digit repeated on every channel)
  digit_size: int = 14  # each 8x8 digit is upscaled to digit_size x digit_size
  min_digits: int = 1
  max_digits: int = 2
  min_speed: float = 1.0  # pixels per frame
  max_speed: float = 2.5
  holdout_fraction: float = 0.2  # share of the 1797 digit images reserved for the "test" split

  def __post_init__(self):
    if self.channels not in (1, 3):
      raise ValueError(f"moving_digits.channels must be 1 or 3, got {self.channels}")
    if not 8 <= self.digit_size < self.size:
      raise ValueError(f"moving_digits.digit_size must be in [8, size={self.size}), got {self.digit_size}")
    if not 1 <= self.min_digits <= self.max_digits:
      raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")
    if self.frames < 1:
      raise ValueError(f"moving_digits.frames must be >= 1, got {self.frames}")
    if not 0 <= self.min_speed <= self.max_speed:
      raise ValueError(f"need 0 <= min_speed <= max_speed, got {self.min_speed}, {self.max_speed}")
    if not 0 < self.holdout_fraction < 1:
      raise ValueError(f"moving_digits.holdout_fraction must be in (0, 1), got {self.holdout_fraction}")


@functools.lru_cache(maxsize=None)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits

  d = load_digits()
  return (d.images / 16.0).astype(np.float64), d.target.astype(np.int32)  # [1797, 8, 8] in [0, 1], [1797]


@functools.lru_cache(maxsize=None)
def upscaled_digits(digit_size: int) -> tuple[np.ndarray, np.ndarray]:
  """All 1797 sklearn digits upscaled: patches [1797, d, d] float64 in [0, 1], labels int32 [1797]."""
  images, labels = _sklearn_digits()
  a = _resample_matrix(digit_size, 8)  # [d, 8]
  patches = np.einsum("yi,nij,xj->nyx", a, images, a)
  return np.clip(patches, 0.0, 1.0), labels


@functools.lru_cache(maxsize=None)
def digit_split_indices(holdout_fraction: float) -> dict[str, np.ndarray]:
  """Disjoint image indices per split. Fixed (seed-independent) so train and test never share an image."""
  _, labels = _sklearn_digits()
  perm = np.random.default_rng(20240601).permutation(len(labels))
  n_test = int(round(holdout_fraction * len(labels)))
  return {"train": np.sort(perm[n_test:]), "test": np.sort(perm[:n_test])}


def paste_subpixel(canvas: np.ndarray, patch: np.ndarray, top_left: np.ndarray) -> None:
  """canvas [S+1, S+1] <- max(canvas, patch placed at a fractional top-left (row, col)) via bilinear shift.

  Bilinear shifting moves the patch's centre of mass by exactly the fractional offset, so tracked centroids
  follow the true trajectory to sub-pixel precision.
  """
  d = patch.shape[0]
  iy, ix = int(np.floor(top_left[0])), int(np.floor(top_left[1]))
  fy, fx = top_left[0] - iy, top_left[1] - ix
  q = np.zeros((d + 1, d + 1))
  q[:d, :d] += (1 - fy) * (1 - fx) * patch
  q[1:, :d] += fy * (1 - fx) * patch
  q[:d, 1:] += (1 - fy) * fx * patch
  q[1:, 1:] += fy * fx * patch
  region = canvas[iy : iy + d + 1, ix : ix + d + 1]
  np.maximum(region, q[: region.shape[0], : region.shape[1]], out=region)


class MovingDigits:
  """1..max_digits sklearn digits moving at constant velocity and bouncing off the canvas walls.

  Metadata per video: `labels` int32 [max_digits] (NULL_LABEL=10 for an absent slot), `positions` float32
  [T, max_digits, 2] = (row, col) of the centre of each digit's d x d box in pixel coordinates (pixel j has
  centre j; 0 for absent slots), `velocities` float32 [max_digits, 2] = initial (row, col) velocity in
  pixels per frame (the sign of a component flips at each bounce), `image_ids` int32 [max_digits] (index into
  sklearn's digits, -1 for absent). A box's top-left moves in [0, size - digit_size] on each axis.
  """

  name: ClassVar[str] = "moving_digits"
  num_classes: ClassVar[int] = NUM_CLASSES
  condition_keys: ClassVar[tuple[str, ...]] = ("labels",)
  meta_keys: ClassVar[tuple[str, ...]] = ("labels", "positions", "velocities", "image_ids")

  def __init__(self, config: Any = None):
    self.config: DigitsConfig = _config_from(DigitsConfig, config)

  @property
  def frame_shape(self) -> tuple[int, int, int, int]:
    c = self.config
    return (c.frames, c.size, c.size, c.channels)

  def _one(self, rng: np.random.Generator, split: str) -> dict[str, np.ndarray]:
    c = self.config
    patches, all_labels = upscaled_digits(c.digit_size)
    pool = digit_split_indices(c.holdout_fraction)[split]
    n = int(rng.integers(c.min_digits, c.max_digits + 1))
    ids = rng.choice(pool, size=n, replace=False)
    travel = c.size - c.digit_size
    start = rng.uniform(0, travel, size=(n, 2))
    speed = rng.uniform(c.min_speed, c.max_speed, size=n)
    angle = rng.uniform(0, 2 * np.pi, size=n)
    vel = np.stack([speed * np.sin(angle), speed * np.cos(angle)], axis=-1)  # [n, 2]
    t = np.arange(c.frames, dtype=np.float64)
    top_left = _reflect(start[None] + t[:, None, None] * vel[None], travel)  # [T, n, 2]

    canvas = np.zeros((c.frames, c.size + 1, c.size + 1))
    for f in range(c.frames):
      for k in range(n):
        paste_subpixel(canvas[f], patches[ids[k]], top_left[f, k])
    q = quantize(canvas[:, : c.size, : c.size] * 2.0 - 1.0)  # [T, S, S]
    video = np.repeat(dequantize(q)[..., None], c.channels, axis=-1)

    labels = np.full(c.max_digits, NULL_LABEL, np.int32)
    labels[:n] = all_labels[ids]
    positions = np.zeros((c.frames, c.max_digits, 2), np.float32)
    positions[:, :n] = top_left + (c.digit_size - 1) / 2.0
    velocities = np.zeros((c.max_digits, 2), np.float32)
    velocities[:n] = vel
    image_ids = np.full(c.max_digits, -1, np.int32)
    image_ids[:n] = ids
    return dict(video=video, labels=labels, positions=positions, velocities=velocities, image_ids=image_ids)

  def generate(self, num_videos: int, seed: int, split: str = "train", *, start: int = 0) -> dict[str, np.ndarray]:
    """Videos start..start+num_videos-1: `video` float32 [N, T, H, W, C] plus the metadata in `meta_keys`."""
    split = canonical_split(split)
    items = [self._one(_video_rng(self.name, seed, split, start + i), split) for i in range(num_videos)]
    return _stack(items, self)

  def model_overrides(self) -> dict[str, int]:
    """Model config keys this world fixes: latent channels and the label vocabulary."""
    c = self.config.channels
    return {"in_channels": c, "out_channels": c, "num_classes": NUM_CLASSES}

  def model_inputs(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"labels": np.asarray(batch["labels"], np.int32)}  # [B, max_digits]

  def null_inputs(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"labels": np.full_like(np.asarray(batch["labels"], np.int32), NULL_LABEL)}


# ----------------------------------------------------------------------------------------------------------
# Camera pan
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CameraConfig:
  size: int = 32  # camera window height = width, pixels
  frames: int = 16
  channels: int = 3  # 3 = RGB, 1 = luma (ITU-R BT.601)
  photo_height: int = 96  # each 427x640 photo is downscaled to this height (width keeps the aspect ratio)
  step: int = 4  # pixels the window moves per non-stay action
  persistence: float = 0.8  # probability of repeating the previous action (random policy with momentum)

  def __post_init__(self):
    if self.channels not in (1, 3):
      raise ValueError(f"camera_pan.channels must be 1 or 3, got {self.channels}")
    if self.photo_height <= self.size:
      raise ValueError(f"camera_pan.photo_height must exceed size={self.size}, got {self.photo_height}")
    if not 1 <= self.step < self.size // 2:
      raise ValueError(f"camera_pan.step must be in [1, size // 2), got {self.step}")
    if self.frames < 1:
      raise ValueError(f"camera_pan.frames must be >= 1, got {self.frames}")
    if not 0 <= self.persistence <= 1:
      raise ValueError(f"camera_pan.persistence must be in [0, 1], got {self.persistence}")


@functools.lru_cache(maxsize=None)
def load_photos(photo_height: int, channels: int) -> tuple[np.ndarray, ...]:
  """scikit-learn's china.jpg and flower.jpg downscaled: uint8 [photo_height, W', channels] each."""
  from sklearn.datasets import load_sample_images

  out = []
  for img in load_sample_images().images:  # uint8 [427, 640, 3]
    h, w, _ = img.shape
    new_w = int(round(w * photo_height / h))
    ry, rx = _resample_matrix(photo_height, h), _resample_matrix(new_w, w)
    small = np.einsum("yi,ijc->yjc", ry, img.astype(np.float64))  # [h', 640, 3]
    small = np.einsum("yjc,xj->yxc", small, rx)
    if channels == 1:
      small = small @ np.array([0.299, 0.587, 0.114])[:, None]
    small = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    small.setflags(write=False)
    out.append(small)
  return tuple(out)


class CameraPan:
  """A size x size camera window panning over one of two photographs, driven by one action per frame.

  Actions: 0 stay, 1 up (row - step), 2 down (row + step), 3 left (col - step), 4 right (col + step); "left"
  moves the camera, so the content slides right in the frame. `actions[:, t]` moves the window from frame t-1
  to frame t; `actions[:, 0]` has no previous frame, is always 0 in generated data and is ignored by the
  renderer. Clamping: a move that would take the window past the photo border is not performed at all (no
  partial step), so the frame repeats; the action is still recorded as issued (the model must learn that pushing against the
  border does nothing, and the play server behaves the same). Metrics compare with the *effective* motion
  (`effective_actions`), i.e. 0 where the border blocked the move.

  Metadata per video: `actions` int32 [T], `image_index` int32 (0 china, 1 flower), `origins` int32 [T, 2]
  = (row, col) top-left of the window in the downscaled photo, `first_frame` float32 [H, W, C].
  The random policy: the action for frame 1 is uniform over the 5 actions; each later frame repeats the
  previous action with probability `persistence`, else draws uniformly again. Both splits pan over the same
  two photos (the world is the photo); "test" videos use fresh start points and action sequences.
  """

  name: ClassVar[str] = "camera_pan"
  num_actions: ClassVar[int] = NUM_ACTIONS
  condition_keys: ClassVar[tuple[str, ...]] = ("actions", "first_frame")
  meta_keys: ClassVar[tuple[str, ...]] = ("actions", "image_index", "origins", "first_frame")

  def __init__(self, config: Any = None):
    self.config: CameraConfig = _config_from(CameraConfig, config)

  @property
  def frame_shape(self) -> tuple[int, int, int, int]:
    c = self.config
    return (c.frames, c.size, c.size, c.channels)

  @property
  def photos(self) -> tuple[np.ndarray, ...]:
    return load_photos(self.config.photo_height, self.config.channels)

  def origin_bounds(self, image_index: int) -> tuple[int, int]:
    """Largest valid (row, col) top-left for the given photo."""
    h, w, _ = self.photos[int(image_index)].shape
    return h - self.config.size, w - self.config.size

  def action_deltas(self) -> np.ndarray:
    s = self.config.step
    return np.array([[0, 0], [-s, 0], [s, 0], [0, -s], [0, s]], np.int32)  # [5, 2] (row, col)

  def pan_origins(self, image_index: int, start_origin, actions) -> np.ndarray:
    """origins int32 [T, 2] for one video: start at start_origin, then one move per actions[1:], skipped
    when it would leave the photo."""
    actions = np.asarray(actions)
    if actions.ndim != 1:
      raise ValueError(f"actions must be [T], got shape {actions.shape}")
    if np.any((actions < 0) | (actions >= NUM_ACTIONS)):
      raise ValueError(f"actions must be in 0..{NUM_ACTIONS - 1} (the null action {NULL_ACTION} is for CFG only)")
    hi = np.array(self.origin_bounds(image_index))
    o = np.asarray(start_origin, np.int64)
    if np.any(o < 0) or np.any(o > hi):
      raise ValueError(f"start_origin {tuple(o)} outside [0, {tuple(hi)}] for image {image_index}")
    deltas = self.action_deltas()
    out = np.empty((len(actions), 2), np.int32)
    for t, a in enumerate(actions):
      moved = o + deltas[a]
      if t > 0 and np.all(moved >= 0) and np.all(moved <= hi):
        o = moved  # all or nothing: every motion is exactly one step, never a partial one
      out[t] = o
    return out

  def crop(self, image_index: int, origins: np.ndarray) -> np.ndarray:
    """frames float32 [T, H, W, C] of the photo at origins int32 [T, 2]."""
    photo, s = self.photos[int(image_index)], self.config.size
    return dequantize(np.stack([photo[r : r + s, c : c + s] for r, c in np.asarray(origins)]))

  def render_pan(self, image_index: int, start_origin, actions) -> np.ndarray:
    """The ground truth: frames float32 [T, H, W, C] for a start origin (row, col) and actions int [T]."""
    return self.crop(image_index, self.pan_origins(image_index, start_origin, actions))

  def render_pan_batch(self, image_index, start_origin, actions) -> np.ndarray:
    """Batched render_pan: image_index [N], start_origin [N, 2], actions [N, T] -> [N, T, H, W, C]."""
    return np.stack([self.render_pan(i, o, a) for i, o, a in zip(image_index, start_origin, actions)])

  def effective_actions(self, origins: np.ndarray) -> np.ndarray:
    """The action each frame actually performed, from origins [..., T, 2] -> int32 [..., T] (frame 0 -> 0)."""
    d = np.diff(np.asarray(origins, np.int64), axis=-2)  # [..., T-1, 2]
    eff = np.zeros(d.shape[:-1], np.int32)
    eff[d[..., 0] < 0] = 1
    eff[d[..., 0] > 0] = 2
    eff[d[..., 1] < 0] = 3
    eff[d[..., 1] > 0] = 4
    return np.concatenate([np.zeros(eff.shape[:-1] + (1,), np.int32), eff], axis=-1)

  def random_actions(self, rng: np.random.Generator) -> np.ndarray:
    c = self.config
    actions = np.zeros(c.frames, np.int32)
    for t in range(1, c.frames):
      if t > 1 and rng.random() < c.persistence:
        actions[t] = actions[t - 1]
      else:
        actions[t] = rng.integers(NUM_ACTIONS)
    return actions

  def _one(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
    image_index = int(rng.integers(len(self.photos)))
    hi_r, hi_c = self.origin_bounds(image_index)
    start = np.array([rng.integers(hi_r + 1), rng.integers(hi_c + 1)])
    actions = self.random_actions(rng)
    origins = self.pan_origins(image_index, start, actions)
    video = self.crop(image_index, origins)
    return dict(
        video=video,
        actions=actions,
        image_index=np.int32(image_index),
        origins=origins,
        first_frame=video[0],
    )

  def generate(self, num_videos: int, seed: int, split: str = "train", *, start: int = 0) -> dict[str, np.ndarray]:
    """Videos start..start+num_videos-1: `video` float32 [N, T, H, W, C] plus the metadata in `meta_keys`."""
    canonical_split(split)
    items = [self._one(_video_rng(self.name, seed, split, start + i)) for i in range(num_videos)]
    return _stack(items, self)

  def model_overrides(self) -> dict[str, int]:
    """Model config keys this world fixes: latent channels, the action vocabulary and the y channels."""
    c = self.config.channels
    return {"in_channels": c, "out_channels": c, "num_actions": NUM_ACTIONS, "cond_channels": c + 1}

  def model_inputs(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    actions = np.asarray(batch["actions"], np.int32)  # [B, T]
    first = batch["first_frame"] if "first_frame" in batch else np.asarray(batch["video"])[:, 0]
    first = np.asarray(first, np.float32)  # [B, H, W, C]
    b, t = actions.shape
    y = np.zeros((b, t) + first.shape[1:-1] + (first.shape[-1] + 1,), np.float32)  # [B, T, H, W, C+1]
    y[:, 0, ..., :-1] = first
    y[:, 0, ..., -1] = 1.0
    return {"actions": actions, "y": y}

  def null_inputs(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    cond = self.model_inputs(batch)
    return {"actions": np.full_like(cond["actions"], NULL_ACTION), "y": np.zeros_like(cond["y"])}


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------


def _stack(items: list[dict[str, np.ndarray]], world) -> dict[str, np.ndarray]:
  if not items:
    raise ValueError(f"{world.name}: num_videos must be >= 1")
  return {k: np.stack([it[k] for it in items]) for k in items[0]}


WORLDS: dict[str, type] = {"moving_digits": MovingDigits, "camera_pan": CameraPan}


def get_world(name: str, config: Any = None):
  """The world `name` built from `config` (None, a dict, a ConfigDict or the world's config dataclass)."""
  if name not in WORLDS:
    raise ValueError(f"unknown world {name!r}; known worlds: {sorted(WORLDS)}")
  return WORLDS[name](config)


def model_overrides(name: str, config: Any = None) -> dict[str, int]:
  """Model config keys (in/out channels, num_classes or num_actions, cond_channels) the world fixes."""
  return get_world(name, config).model_overrides()


def world_config_dict(world) -> dict[str, Any]:
  """The world's resolved config as a JSON-able dict (written to dataset manifests)."""
  return dataclasses.asdict(world.config)
