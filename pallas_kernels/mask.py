"""Static attention masks: what the model, the kernel and the tests agree on.

A `Mask` is a trace-time constant (hashable, numpy-backed), never a traced array. It is either a
dense boolean matrix (small cases, tests) or a union of allowed rectangles `(q0, q1, k0, k1)` (the
video masks, which stay cheap at 131k x 131k tokens). `True` means "query may attend to key".
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


class Mask:
  """Boolean attention mask of shape [Lq, Lk]; build with `from_dense` or `from_ranges`."""

  def __init__(self, shape: tuple[int, int], *, dense: np.ndarray | None = None,
               ranges: tuple[tuple[int, int, int, int], ...] | None = None):
    if (dense is None) == (ranges is None):
      raise ValueError("Mask needs exactly one of dense= or ranges=.")
    self.shape = (int(shape[0]), int(shape[1]))
    self._dense = dense
    self.ranges = ranges

  @classmethod
  def from_dense(cls, dense) -> "Mask":
    dense = np.asarray(dense)
    if dense.ndim != 2 or dense.dtype != np.bool_:
      raise ValueError(f"Mask.from_dense wants a bool[Lq, Lk] array, got {dense.dtype}{list(dense.shape)}.")
    dense = np.ascontiguousarray(dense)
    dense.setflags(write=False)
    return cls(dense.shape, dense=dense)

  @classmethod
  def from_ranges(cls, lq: int, lk: int, ranges: Iterable[Sequence[int]]) -> "Mask":
    out = []
    for r in ranges:
      q0, q1, k0, k1 = (int(x) for x in r)
      if not (0 <= q0 <= q1 <= lq and 0 <= k0 <= k1 <= lk):
        raise ValueError(f"Mask.from_ranges: rectangle {(q0, q1, k0, k1)} is outside [0, {lq}) x [0, {lk}) "
                         "or has start > end.")
      if q1 > q0 and k1 > k0:
        out.append((q0, q1, k0, k1))
    return cls((lq, lk), ranges=tuple(sorted(set(out))))

  @classmethod
  def full(cls, lq: int, lk: int) -> "Mask":
    return cls.from_ranges(lq, lk, [(0, lq, 0, lk)])

  def to_dense(self) -> np.ndarray:
    if self._dense is not None:
      return self._dense
    dense = np.zeros(self.shape, np.bool_)
    for q0, q1, k0, k1 in self.ranges:
      dense[q0:q1, k0:k1] = True
    return dense

  def density(self) -> float:
    return float(self.to_dense().mean())

  def _key(self):
    if self._dense is not None:
      return (self.shape, "dense", self._dense.tobytes())
    return (self.shape, "ranges", self.ranges)

  def __hash__(self):
    return hash(self._key())

  def __eq__(self, other):
    return isinstance(other, Mask) and self._key() == other._key()

  def __repr__(self):
    kind = "dense" if self._dense is not None else f"{len(self.ranges)} rectangles"
    return f"Mask({self.shape[0]}x{self.shape[1]}, {kind})"
