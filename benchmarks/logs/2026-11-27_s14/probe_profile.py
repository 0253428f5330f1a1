"""Where the host time of a jitted flash_attention call goes on the GPU (call 9): cProfile of 200 calls at dense
4096 for flash_attention and for the Mosaic forward called directly. Run from the repository root."""
import cProfile
import os
import pstats
import sys

import jax
sys.path.insert(0, "benchmarks")
import attention as A  # noqa: E402
from pallas_kernels import Mask, mosaic  # noqa: E402

L = 4096
mask = Mask.full(L, L)
args = tuple(A.inputs(L, L)[:3])
fns = {"flash_attention": A.attn_fns("pallas", None)[0],
       "direct": jax.jit(lambda q, k, v: mosaic.forward(q, k, v, mask, sm_scale=A.D ** -0.5, unpadded_o=True)[0])}
for name, fn in fns.items():
  fn(*args).block_until_ready()
  prof = cProfile.Profile()
  prof.enable()
  for _ in range(200):
    out = fn(*args)
  out.block_until_ready()
  prof.disable()
  print(f"==== {name}")
  pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
