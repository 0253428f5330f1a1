"""Dense 4096 forward: flash_attention against the Mosaic forward called directly, in paired rounds, and the
compiled HLO of both (call 7). Run from the repository root; $OUT receives the HLO text."""
import os
import sys
import time

import jax
import numpy as np
sys.path.insert(0, "benchmarks")
import attention as A  # noqa: E402
from pallas_kernels import Mask, mosaic  # noqa: E402

L = 4096
mask = Mask.full(L, L)
flops = 4.0 * A.B * A.H * L * L * A.D
args = tuple(A.inputs(L, L)[:3])
fa = A.attn_fns("pallas", None)[0]
direct = jax.jit(lambda q, k, v: mosaic.forward(q, k, v, mask, sm_scale=A.D ** -0.5, unpadded_o=True)[0])
for name, fn in (("flash_attention", fa), ("direct", direct)):
  with open(os.path.join(os.environ.get("OUT", "/tmp"), f"hlo_{name}.txt"), "w") as f:
    f.write(fn.lower(*args).compile().as_text())
  fn(*args).block_until_ready()
  ts = []
  for _ in range(50):
    t = time.perf_counter()
    out = fn(*args)
    ts.append(time.perf_counter() - t)
    out.block_until_ready()
  print(f"{name}: host time of one call (dispatch) median {np.median(ts) * 1e6:.0f} us, min {min(ts) * 1e6:.0f} us")
A._paired_rounds(print, f"fwd dense {L}", [("flash_attention", fa, flops), ("direct", direct, flops)], args, 12, 10)
