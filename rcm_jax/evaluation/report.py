"""One entry point per world, calibration (ceiling and floor) and the printed table.

This file owns the metric names, their direction (`HIGHER_IS_BETTER`) and how scores are placed between
a floor and a ceiling:
  ceiling  metrics of held-out real videos (the world's own "test" split) for their own conditions;
  floor    metrics of an untrained model's output for the same conditions, passed in by the caller;
  noise    metrics of clipped Gaussian noise (the diffusion prior), the fallback floor.
`format_table` prints each model's score beside them with its position between floor (0%) and
ceiling (100%).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from rcm_jax.evaluation import camera, digits

_EVALUATORS = {"moving_digits": digits.evaluate, "camera_pan": camera.evaluate}
HIGHER_IS_BETTER: dict[str, bool] = {**digits.HIGHER_IS_BETTER, **camera.HIGHER_IS_BETTER}
METRICS: dict[str, tuple[str, ...]] = {
    "moving_digits": tuple(digits.HIGHER_IS_BETTER),
    "camera_pan": tuple(camera.HIGHER_IS_BETTER),
}


def evaluate(world, videos: np.ndarray, meta: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Metrics of generated videos [N, T, H, W, C] in [-1, 1] for the batch metadata that conditioned them.

  `world` is a world object from rcm_jax.data.get_world; `meta` holds the world's `meta_keys` (e.g. the
  batch returned by `world.generate` or `rcm_jax.data.load_all`). Keys of the result: METRICS[world.name].
  """
  if world.name not in _EVALUATORS:
    raise ValueError(f"no metrics for world {world.name!r}; known: {sorted(_EVALUATORS)}")
  missing = [k for k in world.meta_keys if k not in meta and not (k == "first_frame" and "video" in meta)]
  if missing:
    raise ValueError(f"meta lacks {missing}; pass the batch that conditioned the videos (keys {world.meta_keys})")
  return _EVALUATORS[world.name](world, videos, meta)


def noise_videos(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
  """Clipped standard-normal videos: what a sampler returns from a model that predicts nothing useful."""
  return np.clip(np.random.default_rng(seed).standard_normal(shape), -1, 1).astype(np.float32)


def calibrate(world, *, meta: Mapping[str, np.ndarray], real: np.ndarray | None = None,
              floor: np.ndarray | None = None, seed: int = 0) -> dict[str, dict[str, float]]:
  """{'ceiling', 'floor', 'noise'} -> metrics.

  meta: the held-out batch (world.generate(..., split="test") or load_all of the test split); real: its
  videos (default meta['video']); floor: an untrained model's videos for the same conditions (default: the
  noise videos, so 'floor' == 'noise').
  """
  real = np.asarray(meta["video"] if real is None else real, np.float32)
  noise = evaluate(world, noise_videos(real.shape, seed), meta)
  return {
      "ceiling": evaluate(world, real, meta),
      "floor": noise if floor is None else evaluate(world, floor, meta),
      "noise": noise,
  }


def _fmt(x: float) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "nan"
  return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def position(value: float, floor: float, ceiling: float) -> float:
  """Where value sits between floor (0) and ceiling (1); direction-free since both ends are measured."""
  span = ceiling - floor
  if not span or any(map(math.isnan, (value, floor, ceiling))):
    return float("nan")
  return (value - floor) / span


def format_table(rows: Mapping[str, Mapping[str, float]], calibration: Mapping[str, Mapping[str, float]] | None = None) -> str:
  """Markdown table: one line per metric; columns noise, floor, each model (with its % of the way from
  floor to ceiling), ceiling."""
  calibration = calibration or {}
  names = []
  for r in list(rows.values()) + [calibration.get(k, {}) for k in ("floor", "ceiling")]:
    names += [n for n in r if n not in names]
  cols = [c for c in ("noise", "floor") if c in calibration]
  if "noise" in cols and calibration.get("noise") == calibration.get("floor"):
    cols.remove("noise")
  header = ["metric", ""] + [f"{c}" if c != "floor" else "floor (untrained)" for c in cols] + list(rows)
  if "ceiling" in calibration:
    header.append("ceiling (held-out real)")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for n in names:
    arrow = {True: "↑", False: "↓"}.get(HIGHER_IS_BETTER.get(n), "")
    cells = [n, arrow] + [_fmt(calibration[c].get(n, float("nan"))) for c in cols]
    for r in rows.values():
      v = r.get(n, float("nan"))
      cell = _fmt(v)
      if "floor" in calibration and "ceiling" in calibration:
        p = position(v, calibration["floor"].get(n, float("nan")), calibration["ceiling"].get(n, float("nan")))
        if not math.isnan(p):
          cell += f" ({100 * p:.0f}%)"
      cells.append(cell)
    if "ceiling" in calibration:
      cells.append(_fmt(calibration["ceiling"].get(n, float("nan"))))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def format_model_table(rows: Mapping[str, Mapping[str, float]], calibration: Mapping[str, Mapping[str, float]],
                       extra: Mapping[str, Mapping[str, str]] | None = None) -> str:
  """Markdown table with one line per model (rows: label -> metrics), the floor and ceiling lines first and
  last, and `extra` columns (e.g. NFE, samples/s) per label; each cell also gives its % of the way from floor
  to ceiling."""
  extra = extra or {}
  names = []
  for r in list(rows.values()) + [calibration.get(k, {}) for k in ("floor", "ceiling")]:
    names += [n for n in r if n not in names]
  extra_cols = []
  for e in extra.values():
    extra_cols += [c for c in e if c not in extra_cols]
  arrows = {True: " ↑", False: " ↓"}
  header = ["model"] + extra_cols + [n + arrows.get(HIGHER_IS_BETTER.get(n), "") for n in names]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  floor, ceiling = calibration.get("floor", {}), calibration.get("ceiling", {})

  def line(label, metrics, with_position):
    cells = [label] + [str(extra.get(label, {}).get(c, "")) for c in extra_cols]
    for n in names:
      v = metrics.get(n, float("nan"))
      cell = _fmt(v)
      p = position(v, floor.get(n, float("nan")), ceiling.get(n, float("nan")))
      if with_position and not math.isnan(p):
        cell += f" ({100 * p:.0f}%)"
      cells.append(cell)
    return "| " + " | ".join(cells) + " |"

  if floor:
    lines.append(line("floor (untrained)", floor, False))
  lines += [line(label, m, True) for label, m in rows.items()]
  if ceiling:
    lines.append(line("ceiling (held-out real)", ceiling, False))
  return "\n".join(lines)
