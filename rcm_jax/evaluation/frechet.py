"""Frechet distance between Gaussian fits of two feature sets (the FID formula, on any features)."""

from __future__ import annotations

import numpy as np
from scipy import linalg


def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """features [N, D] -> mean [D], covariance [D, D] (float64)."""
  f = np.asarray(features, np.float64)
  return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))."""
  diff = mu1 - mu2
  # A tiny ridge keeps sqrtm defined when a covariance is singular (e.g. a batch of blank frames); its effect
  # on the distance is ~1e-6 per dimension.
  eps = 1e-6 * np.eye(len(mu1))
  covmean = np.real(linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps)))
  return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean), 0.0))
