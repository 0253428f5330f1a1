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
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():  # singular product: regularise as the FID reference code does
    eps = 1e-6 * np.eye(len(mu1))
    covmean = linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
  covmean = np.real(covmean)
  return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean), 0.0))
