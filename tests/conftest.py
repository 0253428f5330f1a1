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
