"""Does XLA fuse the feed-forward's gelu(tanh) into the GEMM epilogue? One Wan2.1-1.3B FFN block on a GPU.

  XLA_FLAGS=... python benchmarks/ffn_probe.py --tokens 4680 65520

For each token count: the FFN forward (a streaming chunk is 4680 tokens) and its forward+backward (a TF training
sequence is 65,520), jitted with bf16 params and inputs. Prints the median time of 20 calls and whether the
optimised HLO holds a cuBLASLt GELU epilogue (`"epilogue":"GELU..."` / `BIAS_GELU...`) or a separate
elementwise tanh fusion. The XLA flags under test come from the environment, so run it once per flag set.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from rcm_jax.models.config import get_config  # noqa: E402
from rcm_jax.models.layers import FeedForward  # noqa: E402


def _median_ms(fn, *args, iters=20):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return sorted(times)[len(times) // 2] * 1e3


def _fusion_report(compiled) -> str:
  hlo = compiled.as_text()
  epilogues = sorted(set(re.findall(r'"epilogue":"([A-Z_]+)"', hlo)))
  tanh_fusions = len(re.findall(r"tanh\(", hlo))
  return f"epilogues {epilogues or '-'}, tanh ops in HLO {tanh_fusions}"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--tokens", type=int, nargs="+", default=[4680, 65520])
  args = ap.parse_args()
  cfg = get_config("wan_1p3b", dtype="bfloat16")   # the streaming benchmark's compute dtype
  ffn = FeedForward(cfg)
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  for n in args.tokens:
    x = jax.random.normal(jax.random.key(0), (1, n, cfg.dim), jnp.bfloat16)
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), ffn.init(jax.random.key(1), x))
    fwd = jax.jit(ffn.apply)
    flops = 4 * n * cfg.dim * cfg.ffn_dim

    def loss(p, x):
      return jnp.sum(ffn.apply(p, x).astype(jnp.float32) ** 2)

    fb = jax.jit(jax.grad(loss, argnums=(0, 1)))
    for name, fn, mult in (("fwd", fwd, 1), ("fwd+bwd", fb, 3)):
      compiled = fn.lower(params, x).compile()
      ms = _median_ms(compiled, params, x)
      print(f"{n:6d} tokens {name:8s} {ms:8.3f} ms {mult * flops / ms / 1e9:6.0f} TFLOP/s | {_fusion_report(compiled)}")


if __name__ == "__main__":
  main()
