"""Toy-world metrics from ground truth: digits.py (moving digits), camera.py (camera pan), frechet.py
(Frechet distance), report.py (evaluate, calibrate, format_table)."""

from rcm_jax.evaluation.report import (HIGHER_IS_BETTER, METRICS, calibrate, evaluate, format_table,
                                       noise_videos, position)
