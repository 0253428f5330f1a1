"""Dense 4096 forward in paired rounds: flash_attention (default: persistent CTAs at 32 key tiles a query
tile), the Mosaic forward with one CTA per item and with persistent CTAs, and cuDNN; then dense 16384 the same
way. Run as `python3 probe_4096.py` from the repository root (call 6)."""
import os
import sys

import jax
sys.path.insert(0, "benchmarks")
import attention as A  # noqa: E402
from pallas_kernels import Mask, mosaic  # noqa: E402

log = print
for L in (4096, 16384, 4096):
  mask = Mask.full(L, L)
  flops = 4.0 * A.B * A.H * L * L * A.D
  fwd = lambda n: jax.jit(lambda q, k, v: mosaic.forward(q, k, v, mask, sm_scale=A.D ** -0.5, unpadded_o=True,
                                                         cfg=mosaic.MosaicConfig(persistent_ctas=n))[0])
  runs = [("flash_attention", A.attn_fns("pallas", None)[0], flops), ("mosaic_one_cta", fwd(0), flops),
          ("mosaic_persist132", fwd(132), flops), ("cudnn", A.attn_fns("cudnn", None)[0], flops)]
  A._paired_rounds(log, f"fwd dense {L}", runs, tuple(A.inputs(L, L)[:3]), 12, 10)
