"""The XLA flags rcm-jax sets for its jobs, and the one function that adds them to XLA_FLAGS.

XLA reads XLA_FLAGS once, when the first backend starts, so `add` must run before anything touches a device
(`jax.devices()`, the first jitted call, `jax.distributed.initialize`). A flag the user already set in
XLA_FLAGS, with any value, is left as the user set it.

GEMM_EPILOGUES (on for `sample` and `play`: `sample.gemm_epilogues`; `benchmarks/streaming.py` has the same
switch). With Triton GEMM fusions off and cuBLASLt on, XLA's GEMM rewriter folds the feed-forward's bias and
gelu(tanh) into the cuBLASLt epilogue (`BIAS_GELU`) instead of a separate elementwise pass over the [tokens, ffn]
hidden state, 4% of a streaming chunk's device time at the Wan2.1-1.3B shape. Measured on one H100, streaming
chunk-wise (benchmarks/RESULTS.md, "Sixth run"): 2-step noisy 96.3 -> 98.3 FPS, 4-step clean 40.1 -> 41.2 FPS
against the same machine without the flags. Not measured on training steps, so training does not set them. The
flags name GPU options only; other backends parse and ignore them.
"""
from __future__ import annotations

import os
from typing import MutableMapping, Sequence

GEMM_EPILOGUES = ("--xla_gpu_enable_cublaslt=true", "--xla_gpu_enable_triton_gemm=false")


def _name(flag: str) -> str:
  return flag.split("=", 1)[0]


def backends_started() -> bool:
  """Whether a jax backend has started (XLA_FLAGS is read then, and never again)."""
  from jax._src import xla_bridge   # the public API has no such query
  return xla_bridge.backends_are_initialized()


def merged(flags: Sequence[str], current: str) -> tuple[str, tuple[str, ...]]:
  """`current` (an XLA_FLAGS value) with each of `flags` appended unless `current` names it; -> (value, added)."""
  for flag in flags:
    if not flag.startswith("--") or "=" not in flag:
      raise ValueError(f"XLA flag {flag!r}: write it as --name=value")
  present = {_name(f) for f in current.split()}
  added = tuple(f for f in flags if _name(f) not in present)
  return " ".join([*current.split(), *added]), added


def add(flags: Sequence[str], environ: MutableMapping[str, str] | None = None) -> tuple[str, ...]:
  """Appends `flags` to XLA_FLAGS in `environ` (default os.environ), keeping any the user set; returns the added.

  Raises RuntimeError when a jax backend has already started in this process: the flags would not apply.
  """
  env = os.environ if environ is None else environ
  value, added = merged(flags, env.get("XLA_FLAGS", ""))
  if added and environ is None and backends_started():
    raise RuntimeError(f"XLA flags {' '.join(added)} must be set before jax starts a backend (XLA reads "
                       "XLA_FLAGS once); call rcm_jax.xla_flags.add before the first device use.")
  if added:
    env["XLA_FLAGS"] = value
  return added
