"""Moving-digits metrics, computed from ground truth (scikit-learn's digits), not from a trained critic.

This file owns the digit detector/tracker, the digit classifier and the four digits metrics:
  digits/class_accuracy  share of conditioned digits whose class is found in the video (multiset match of
                         per-track predicted classes against the conditioned labels), in [0, 1].
  digits/detection_rate  share of frames in which all conditioned digits are found as digit-like blobs.
  digits/motion_rms_px   RMS distance (pixels) of tracked centroids from the best constant-velocity-with-
                         bounces trajectory at a speed the world can produce, with the walls where the
                         canvas puts them (see fit_bounce_track: a frozen digit cannot pass as v = 0 or as
                         bouncing off walls placed around it). A digit tracked in fewer than 3 frames
                         scores the penalty size / 2, so a model that draws no digits cannot score well.
  digits/frechet         Frechet distance between features of consecutive-frame pairs of the videos and of
                         128 real training videos. Feature: PCA (32 components, fitted on the reference) of
                         [frame t, frame t+1 - frame t], intensity average-pooled to 16x16 -- cheap,
                         deterministic, no trained critic; it measures the match of the pixel and motion
                         distribution (digit shapes, positions, blur, displacement), not perceptual quality,
                         and it is biased upwards for small samples (compare scores at equal N).

Detection (n = number of conditioned digits): intensity = mean over channels mapped to [0, 1]; pixels above
0.4 are ink; weighted k-means with n centres (started from the previous frame's prediction, or from the n
heaviest blobs) splits the ink into digits, faint pixels above 0.02 join the nearest centre for sub-pixel
centroids. A digit counts as found if its ink fits in a (digit_size + 3)-pixel box and weighs at least
0.02 * digit_size**2, so noise and smears are rejected and such frames drop out of tracking instead of
producing wrong tracks. The classifier (an RBF support-vector machine) is fitted on crops produced by this
same detector and tracker, from train-split digit images rendered alone at random sub-pixel offsets and from
real train-split videos of the world (touching digits included), so its input matches what it sees in
generated frames. Held-out real videos are the ceiling: with two 14 px digits on a 32 px canvas the digits
touch in most frames, which costs the ceiling some accuracy (~0.9) and motion residual (~0.4-0.8 px, from
the k-means split of touching digits).
"""

from __future__ import annotations

import collections
import functools
import itertools

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from rcm_jax.data import worlds as worlds_lib
from rcm_jax.evaluation import frechet

_INK = 0.4  # intensity of a stroke pixel
_FRINGE = 0.02  # faint anti-aliased edge pixels still count towards centroids
_STRUCT = np.ones((3, 3), bool)
_REFERENCE_SEED = 987_654
_NUM_REFERENCE_VIDEOS = 128
_NUM_CLASSIFIER_FRAMES = 1536  # frames of real train videos whose tracked crops train the classifier
_PCA_DIMS = 32
_MIN_TRACK_FRAMES = 3
_MAX_CENTROID_OFFSET = 2.5  # pixels between a digit's centre of mass and the centre of its box


def intensity(videos: np.ndarray) -> np.ndarray:
  """[..., H, W, C] in [-1, 1] -> [..., H, W] in [0, 1]."""
  return np.clip((np.asarray(videos, np.float32).mean(-1) + 1.0) * 0.5, 0.0, 1.0)


def _init_centres(frame: np.ndarray, n: int) -> np.ndarray | None:
  """n starting centres [n, 2]: the heaviest ink blobs, splitting the heaviest along its main axis if short."""
  lab, num = ndimage.label(frame > _INK, _STRUCT)
  if num == 0:
    return None
  idx = np.arange(1, num + 1)
  mass = ndimage.sum_labels(frame, lab, idx)
  heavy = idx[np.argsort(-mass)][:n]
  centres = [np.array(ndimage.center_of_mass(frame, lab, j)) for j in heavy]
  while len(centres) < n:  # fewer blobs than digits: spread points along the heaviest blob's main axis
    ys, xs = np.nonzero(lab == heavy[0])
    pts = np.stack([ys, xs], -1).astype(np.float64)
    mu = pts.mean(0)
    _, vecs = np.linalg.eigh(np.cov(pts.T) + 1e-6 * np.eye(2))
    k = len(centres)
    centres = [mu + (i - (k) / 2) * 3.0 * vecs[:, -1] for i in range(k + 1)]
  return np.array(centres[:n])


def detect(frame: np.ndarray, digit_size: int, n: int, init: np.ndarray | None = None):
  """Split the ink of one intensity frame [H, W] into n digits by weighted k-means on pixel coordinates.

  Starts from `init` [n, 2] (the previous frame's centres, which keeps track identities) or from the
  heaviest blobs. Returns centroids [n, 2] (row, col), crops [n, d, d] (each digit's own pixels centred on
  its centroid) and valid bool [n]: the digit's pixels fit in a (d + 3)-pixel box and weigh at least
  0.02 d^2, so merged noise or smears are rejected. Returns None when the frame has no ink.
  """
  d = digit_size
  h, w = frame.shape
  centres = _init_centres(frame, n) if init is None else np.asarray(init, np.float64)
  if centres is None:
    return None
  ys, xs = np.nonzero(frame > _FRINGE)
  if len(ys) == 0:
    return None
  pts = np.stack([ys, xs], -1).astype(np.float64)  # [P, 2]
  wts = frame[ys, xs].astype(np.float64)
  ink = wts > _INK
  for _ in range(8):  # Lloyd iterations on ink pixels, weighted by intensity
    assign = np.argmin(((pts[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    new = centres.copy()
    for k in range(n):
      m = ink & (assign == k)
      if m.any():
        new[k] = (pts[m] * wts[m, None]).sum(0) / wts[m].sum()
    if np.allclose(new, centres, atol=1e-3):
      break
    centres = new
  # Final assignment includes faint fringe pixels so centroids follow sub-pixel motion exactly.
  assign = np.argmin(((pts[:, None] - centres[None]) ** 2).sum(-1), axis=1)
  centroids = np.zeros((n, 2))
  crops = np.zeros((n, d, d), np.float32)
  valid = np.zeros(n, bool)
  for k in range(n):
    m = assign == k
    mass = wts[m].sum()
    if mass <= 0:
      continue
    centroids[k] = (pts[m] * wts[m, None]).sum(0) / mass
    mi = m & ink
    if mi.any():
      ext = pts[mi].max(0) - pts[mi].min(0) + 1
      valid[k] = bool(np.all(ext <= d + 3) and mass >= 0.02 * d * d)
    r0, c0 = np.rint(centroids[k] - (d - 1) / 2).astype(int)
    py, px = ys[m] - r0, xs[m] - c0
    inside = (py >= 0) & (py < d) & (px >= 0) & (px < d)
    crops[k, py[inside], px[inside]] = wts[m][inside]
  return centroids, crops, valid


@functools.lru_cache(maxsize=None)
def _classifier(config: worlds_lib.DigitsConfig):
  """RBF support-vector classifier on detector crops of train-split digits: isolated digits at random sub-pixel offsets, plus
  the crops the tracker cuts from real train-split videos of this world (so crops of touching digits,
  which the k-means split contaminates, are in the training distribution too)."""
  from sklearn.svm import SVC

  d = config.digit_size
  patches, labels = worlds_lib.upscaled_digits(d)
  train = worlds_lib.digit_split_indices(config.holdout_fraction)["train"]
  rng = np.random.default_rng(0)
  xs, ys = [], []
  size = d + 8
  for i in train:
    canvas = np.zeros((size + 1, size + 1))
    worlds_lib.paste_subpixel(canvas, patches[i], rng.uniform(1, 7, size=2))
    frame = intensity(worlds_lib.dequantize(worlds_lib.quantize(canvas[:size, :size] * 2 - 1))[..., None])
    _, crops, valid = detect(frame, d, 1)
    if valid[0]:
      xs.append(crops[0].ravel())
      ys.append(labels[i])
  world = worlds_lib.MovingDigits(config)
  batch = world.generate(-(-_NUM_CLASSIFIER_FRAMES // config.frames), _REFERENCE_SEED + 1, "train")
  for video, lab, gt in zip(intensity(batch["video"]), batch["labels"], batch["positions"]):
    n = int((lab != worlds_lib.NULL_LABEL).sum())
    pos, crops, valid, _ = track(video, d, n)
    for f in np.nonzero(valid)[0]:
      # label each track by the true digit nearest to it in this frame
      perm = min(itertools.permutations(range(n)), key=lambda p: np.sum((gt[f, list(p)] - pos[f]) ** 2))
      xs += [c.ravel() for c in crops[f]]
      ys += [lab[j] for j in perm]
  # On tracked crops of held-out videos (touching digits included) this SVC is right on ~90% of crops,
  # shrunk LDA on ~79%; logistic regression takes ~20 s to fit on 2 cores. The fit takes ~1-2 s.
  clf = SVC(C=10.0, gamma="scale", decision_function_shape="ovr")
  clf.fit(np.array(xs), np.array(ys))
  return clf


@functools.lru_cache(maxsize=None)
def _reference(config: worlds_lib.DigitsConfig):
  """PCA projection and feature statistics of real training videos."""
  world = worlds_lib.MovingDigits(config)
  ref = world.generate(_NUM_REFERENCE_VIDEOS, _REFERENCE_SEED, "train")["video"]
  x = frame_features(intensity(ref), config.size)  # [N*(T-1), 2D]
  mean = x.mean(0)
  _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
  proj = vt[:_PCA_DIMS].T  # [D, k]
  mu, sigma = frechet.stats((x - mean) @ proj)
  return mean, proj, mu, sigma


def _axis_errors(x: np.ndarray, t: np.ndarray, travel: float, s0s: np.ndarray, vs: np.ndarray, centre: float):
  """For 1-D positions x [n] at times t [n]: best squared error over s0 for each v -> err [V], s0 [V].

  The model is centre + offset + reflect(s0 + v t, travel): the digit box bounces between the walls and
  its centroid sits `offset` from the box centre. The offset is the least-squares one (the mean) clipped to
  +-_MAX_CENTROID_OFFSET, so the walls stay where the canvas puts them: a digit that stands still cannot
  pass as bouncing off walls placed around it.
  """
  r = worlds_lib._reflect(s0s[:, None, None] + vs[None, :, None] * t, travel)  # [S, V, n]
  dev = x - centre - r
  off = np.clip(dev.mean(-1, keepdims=True), -_MAX_CENTROID_OFFSET, _MAX_CENTROID_OFFSET)
  err = ((dev - off) ** 2).mean(-1)  # [S, V]
  best = err.argmin(0)
  return err[best, np.arange(len(vs))], s0s[best]


def fit_bounce_track(pos: np.ndarray, valid: np.ndarray, travel: float, min_speed: float,
                     max_speed: float, centre: float) -> float:
  """RMS distance (pixels) of a 2-D track pos [T, 2] (valid frames only) from the best trajectory
  offset + reflect(s0 + v t, travel) per axis whose speed |v| lies in [0.8 min_speed, 1.2 max_speed].

  The speed constraint makes a digit that stands still (or drifts too fast) score badly even though it
  would fit v = 0 perfectly. (vy, vx) come from a 0.05 px/frame grid scored jointly, s0 from a 0.25 px grid
  per axis, then both are refined on a 10x finer grid around the optimum.
  """
  t = np.arange(len(pos))[valid].astype(np.float64)
  p = pos[valid].astype(np.float64)
  vmax = 1.2 * max_speed
  vs = np.linspace(-vmax, vmax, int(round(2 * vmax / 0.05)) + 1)
  s0s = np.linspace(0, travel, int(round(travel / 0.25)) + 1)
  (ey, sy), (ex, sx) = (_axis_errors(p[:, a], t, travel, s0s, vs, centre) for a in (0, 1))
  speed = np.hypot(vs[:, None], vs[None, :])
  total = np.where((speed >= 0.8 * min_speed) & (speed <= vmax), ey[:, None] + ex[None, :], np.inf)
  iy, ix = np.unravel_index(np.argmin(total), total.shape)
  sq = 0.0
  for a, (v, s0) in enumerate(((vs[iy], sy[iy]), (vs[ix], sx[ix]))):
    fine_v = np.linspace(v - 0.05, v + 0.05, 11)
    fine_s = np.linspace(s0 - 0.25, s0 + 0.25, 11)
    err, _ = _axis_errors(p[:, a], t, travel, fine_s, fine_v, centre)
    sq += min(err.min(), (ey, ex)[a][(iy, ix)[a]])
  return float(np.sqrt(sq))


def track(frames: np.ndarray, digit_size: int, n: int):
  """Follow n digits through intensity frames [T, H, W].

  Returns positions [T, n, 2], crops [T, n, d, d], valid [T] (all n digits found) and separated [T]
  (valid and the digits at least 0.8 d apart, so their crops are uncontaminated).
  """
  num_frames, d = len(frames), digit_size
  pos = np.zeros((num_frames, n, 2))
  crops = np.zeros((num_frames, n, d, d), np.float32)
  valid = np.zeros(num_frames, bool)
  last, last_f, vel = None, 0, np.zeros((n, 2))
  h, w = frames.shape[1:]
  for f in range(num_frames):
    # constant-velocity prediction keeps identities apart when two digits pass each other
    pred = None if last is None else np.clip(last + vel * (f - last_f), 0, [h - 1, w - 1])
    res = detect(frames[f], d, n, init=pred)
    if res is not None and pred is not None and not res[2].all():
      res = detect(frames[f], d, n)  # lost the digits: restart from the frame's blobs
    if res is None or not res[2].all():
      continue
    cent, crop, _ = res
    if pred is not None:  # keep identities when a restart reordered the digits
      perm = list(min(itertools.permutations(range(n)), key=lambda p: np.sum((cent[list(p)] - pred) ** 2)))
      cent, crop = cent[perm], crop[perm]
      vel = (cent - last) / (f - last_f)
    pos[f], crops[f], valid[f] = cent, crop, True
    last, last_f = cent, f
  gaps = np.linalg.norm(pos[:, :, None] - pos[:, None], axis=-1) + np.eye(n) * 1e9  # [T, n, n]
  separated = valid & (gaps.min(axis=(1, 2)) >= 0.8 * d)
  return pos, crops, valid, separated


def frame_features(frames: np.ndarray, size: int) -> np.ndarray:
  """Intensity videos [N, T, H, W] -> features [N * max(T - 1, 1), 2 D]: each frame next to its change to
  the following frame, both average-pooled by the largest p <= size / 16 that divides size (D = 256 at 32
  or 64 px). The change half makes the distance see motion: frozen or flickering videos land far away."""
  p = max(q for q in range(1, max(size // 16, 1) + 1) if size % q == 0)
  n, t = frames.shape[:2]
  f = frames.reshape(n, t, size // p, p, size // p, p).mean((3, 5)).reshape(n, t, -1).astype(np.float64)
  delta = f[:, 1:] - f[:, :-1] if t > 1 else np.zeros_like(f)
  cur = f[:, :-1] if t > 1 else f
  return np.concatenate([cur, delta], -1).reshape(-1, 2 * f.shape[-1])


def evaluate(world: worlds_lib.MovingDigits, videos: np.ndarray, meta) -> dict[str, float]:
  """Digits metrics of videos [N, T, H, W, C] in [-1, 1] conditioned on meta['labels'] [N, max_digits]."""
  c = world.config
  videos = np.asarray(videos, np.float32)
  labels = np.asarray(meta["labels"])
  if videos.shape[1:] != world.frame_shape:
    raise ValueError(f"videos have shape {videos.shape[1:]} per video, the world makes {world.frame_shape}")
  if len(labels) != len(videos):
    raise ValueError(f"{len(videos)} videos but {len(labels)} label rows")
  clf = _classifier(c)
  frames = intensity(videos)  # [N, T, H, W]
  travel = c.size - c.digit_size
  penalty = c.size / 2.0

  correct, total, detected, rms = 0, 0, 0, []
  for v in tqdm(range(len(videos)), desc="digits metrics", leave=False, disable=len(videos) < 256):
    cond = [int(l) for l in labels[v] if l != worlds_lib.NULL_LABEL]
    n = len(cond)
    total += n
    if n == 0:
      continue
    pos, crops, valid, separated = track(frames[v], c.digit_size, n)
    detected += int(valid.sum())
    use = separated if separated.any() else valid
    if use.any():
      # one-vs-rest scores summed over the frames of each track: a vote weighted by confidence
      score = clf.decision_function(crops[use].reshape(-1, c.digit_size**2)).reshape(-1, n, len(clf.classes_))
      pred = collections.Counter(int(clf.classes_[i]) for i in score.sum(0).argmax(-1))
      correct += sum((pred & collections.Counter(cond)).values())
    for k in range(n):
      if valid.sum() < _MIN_TRACK_FRAMES:
        rms.append(penalty)
        continue
      rms.append(fit_bounce_track(pos[:, k], valid, travel, c.min_speed, c.max_speed, (c.digit_size - 1) / 2))

  mean, proj, mu_ref, sigma_ref = _reference(c)
  mu, sigma = frechet.stats((frame_features(frames, c.size) - mean) @ proj)
  return {
      "digits/class_accuracy": correct / max(total, 1),
      "digits/detection_rate": detected / (len(videos) * c.frames),
      "digits/motion_rms_px": float(np.mean(rms)) if rms else penalty,
      "digits/frechet": frechet.frechet_distance(mu, sigma, mu_ref, sigma_ref),
  }


HIGHER_IS_BETTER = {
    "digits/class_accuracy": True,
    "digits/detection_rate": True,
    "digits/motion_rms_px": False,
    "digits/frechet": False,
}
