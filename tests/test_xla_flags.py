"""rcm_jax.xla_flags: merging into XLA_FLAGS without overriding the user, the started-backend guard, and that the
flags the jobs set are known to this jaxlib (an unknown flag in XLA_FLAGS aborts the process)."""
import os
import subprocess
import sys

import jax
import pytest

from rcm_jax import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_merge_appends_missing_and_keeps_the_users_values():
  env = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true --xla_dump_to=/tmp/d"}
  added = xla_flags.add(xla_flags.GEMM_EPILOGUES, env)
  assert added == ("--xla_gpu_enable_cublaslt=true",)
  assert env["XLA_FLAGS"].split() == ["--xla_gpu_enable_triton_gemm=true", "--xla_dump_to=/tmp/d",
                                      "--xla_gpu_enable_cublaslt=true"]
  assert xla_flags.add(xla_flags.GEMM_EPILOGUES, env) == ()          # idempotent
  empty = {}
  assert xla_flags.add(xla_flags.GEMM_EPILOGUES, empty) == xla_flags.GEMM_EPILOGUES
  assert empty["XLA_FLAGS"] == " ".join(xla_flags.GEMM_EPILOGUES)


@pytest.mark.parametrize("flag", ["xla_gpu_enable_cublaslt=true", "--xla_gpu_enable_cublaslt"])
def test_bad_flag_spelling(flag):
  with pytest.raises(ValueError, match="--name=value"):
    xla_flags.add([flag], {})


def test_refuses_once_a_backend_has_started(monkeypatch):
  jax.devices()   # this process's backend is up: XLA has read XLA_FLAGS already
  monkeypatch.setenv("XLA_FLAGS", "")
  with pytest.raises(RuntimeError, match="before jax starts a backend"):
    xla_flags.add(xla_flags.GEMM_EPILOGUES)
  assert os.environ["XLA_FLAGS"] == ""                                # nothing half-applied
  monkeypatch.setenv("XLA_FLAGS", " ".join(xla_flags.GEMM_EPILOGUES))
  assert xla_flags.add(xla_flags.GEMM_EPILOGUES) == ()                # nothing to add: no error


def test_the_jobs_flags_parse_in_a_fresh_process():
  code = ("from rcm_jax import xla_flags; xla_flags.add(xla_flags.GEMM_EPILOGUES); import os, jax, jax.numpy as jnp; "
          "print(float(jax.jit(lambda x: (x @ x).sum())(jnp.ones((4, 4)))), os.environ['XLA_FLAGS'])")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(env, JAX_PLATFORMS="cpu"),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split(None, 1) == ["64.0", " ".join(xla_flags.GEMM_EPILOGUES) + "\n"]
