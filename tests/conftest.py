"""Shared pytest fixtures.

`ref_python`: the Python of `.venv-ref` (torch CPU, diffusers, transformers; made by scripts/setup_ref_env.sh),
in which the Wan2.1 interop parity tests build small random reference models in a subprocess. Missing, the
parity tests skip, except under CI (`RCM_REQUIRE_REF=1`), where a missing reference stack is a failure.
"""
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ref_python() -> str:
  py = ROOT / ".venv-ref" / "bin" / "python"
  if not py.exists():
    if os.environ.get("RCM_REQUIRE_REF") == "1":
      pytest.fail(".venv-ref is missing: run `bash scripts/setup_ref_env.sh` (CI requires the reference stack)")
    pytest.skip("no .venv-ref (torch reference stack): run `bash scripts/setup_ref_env.sh`")
  return str(py)


def random_params(shapes, seed: int):
  """Random params for a param-shape tree (numpy; nothing compiled): weights ~ N(0, 1/fan_in), norm scales ~ 1,
  so a zero-initialised output head still gives a non-trivial velocity; Wan's 0.02 for the time and text
  embedders (the network sees 1000 t: larger weights make v jump with t)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name and "scale_shift" not in name:
      return jnp.asarray(1 + 0.05 * rng.normal(size=s.shape), s.dtype)
    std = 1 / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) >= 2 else 0.02
    if "time_embedder" in name or "text_embedder" in name:
      std = 0.02
    return jnp.asarray(std * rng.normal(size=s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)
