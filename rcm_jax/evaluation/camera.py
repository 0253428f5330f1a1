"""Camera-pan metrics against the exact ground truth from `CameraPan.render_pan`.

This file owns:
  camera/psnr             dB, frames 1..T-1 (frame 0 is the conditioning frame) against the true crops for
                          the same photo, start origin and actions; per-video MSE, capped at 60 dB (exact).
  camera/ssim             mean SSIM (Gaussian window, sigma 1.5, on [0, 1] intensities) over the same frames.
  camera/action_accuracy  share of transitions t-1 -> t (t >= 1) whose estimated motion class equals the
                          effective action (the conditioned action, or stay where the border clamped it).
The motion class of a transition is the candidate window move (stay/up/down/left/right by `step` pixels)
under which frame t best matches frame t-1 shifted: least mean squared difference on the central region
that both frames see under every candidate. This is a best-integer-shift search restricted to the five
moves the world can make, so it needs no trained critic.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from rcm_jax.data import worlds as worlds_lib

PSNR_CAP_DB = 60.0


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Per-leading-index PSNR in dB of a, b [N, ...] in [-1, 1] (data range 2), capped at PSNR_CAP_DB."""
  mse = ((np.asarray(a, np.float64) - b) ** 2).reshape(len(a), -1).mean(-1)
  return np.minimum(10 * np.log10(4.0 / np.maximum(mse, 1e-30)), PSNR_CAP_DB)


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> np.ndarray:
  """Per-image SSIM of a, b [M, H, W, C] in [-1, 1] -> [M] (Wang et al. 2004 constants).

  Computed on intensities mapped to [0, 1]: SSIM's luminance term assumes non-negative signals (on [-1, 1]
  an inverted image would score high, its two negative terms multiplying to a positive).
  """
  a, b = (np.asarray(a, np.float64) + 1) / 2, (np.asarray(b, np.float64) + 1) / 2
  blur = lambda x: ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="reflect", truncate=3.5)
  c1, c2 = 0.01**2, 0.03**2
  mu_a, mu_b = blur(a), blur(b)
  var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
  return s.reshape(len(s), -1).mean(-1)


def estimate_actions(videos: np.ndarray, step: int) -> np.ndarray:
  """Motion class of every transition of videos [N, T, H, W, C] -> int32 [N, T] (frame 0 gets 0).

  Moving the window by (dr, dc) means frame_t[y, x] = frame_{t-1}[y + dr, x + dc].
  """
  v = np.asarray(videos, np.float32)
  n, t, h, w, _ = v.shape
  m = step
  deltas = np.array([[0, 0], [-m, 0], [m, 0], [0, -m], [0, m]])
  cur = v[:, 1:, m : h - m, m : w - m]  # [N, T-1, H-2m, W-2m, C]
  errs = []
  for dr, dc in deltas:
    prev = v[:, :-1, m + dr : h - m + dr, m + dc : w - m + dc]
    errs.append(((cur - prev) ** 2).mean(axis=(2, 3, 4)))
  est = np.argmin(np.stack(errs, -1), axis=-1).astype(np.int32)  # [N, T-1]
  return np.concatenate([np.zeros((n, 1), np.int32), est], axis=1)


def true_videos(world: worlds_lib.CameraPan, meta) -> tuple[np.ndarray, np.ndarray]:
  """Ground truth for meta: frames [N, T, H, W, C] and origins [N, T, 2], re-rendered from the actions."""
  index, start, actions = np.asarray(meta["image_index"]), np.asarray(meta["origins"])[:, 0], np.asarray(meta["actions"])
  origins = np.stack([world.pan_origins(i, o, a) for i, o, a in zip(index, start, actions)])
  frames = np.stack([world.crop(i, o) for i, o in zip(index, origins)])
  return frames, origins


def evaluate(world: worlds_lib.CameraPan, videos: np.ndarray, meta) -> dict[str, float]:
  """Camera metrics of videos [N, T, H, W, C] in [-1, 1] generated for meta's photo, start and actions."""
  videos = np.asarray(videos, np.float32)
  if videos.shape[1:] != world.frame_shape:
    raise ValueError(f"videos have shape {videos.shape[1:]} per video, the world makes {world.frame_shape}")
  if len(meta["actions"]) != len(videos):
    raise ValueError(f"{len(videos)} videos but {len(meta['actions'])} action rows")
  truth, origins = true_videos(world, meta)
  t0 = 1 if videos.shape[1] > 1 else 0
  gen, ref = videos[:, t0:], truth[:, t0:]
  scores = {
      "camera/psnr": float(psnr(gen, ref).mean()),
      "camera/ssim": float(ssim(gen.reshape((-1,) + gen.shape[2:]), ref.reshape((-1,) + ref.shape[2:])).mean()),
  }
  if videos.shape[1] > 1:
    est = estimate_actions(videos, world.config.step)[:, 1:]
    eff = world.effective_actions(origins)[:, 1:]
    scores["camera/action_accuracy"] = float((est == eff).mean())
  else:
    scores["camera/action_accuracy"] = float("nan")
  return scores


HIGHER_IS_BETTER = {"camera/psnr": True, "camera/ssim": True, "camera/action_accuracy": True}
