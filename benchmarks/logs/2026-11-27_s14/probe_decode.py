"""The streaming decode shapes in paired rounds: the Mosaic forward with split-KV (`kv_splits=None`, the
default rule) and without (1), called directly, `flash_attention`, and cuDNN (call 8). Run from the repo root."""
import sys

import jax
sys.path.insert(0, "benchmarks")
import attention as A  # noqa: E402
from pallas_kernels import Mask, mosaic  # noqa: E402

for lq, lk in ((1560, 16380), (1560, 32760), (4680, 16380)):
  mask = Mask.full(lq, lk)
  flops = 4.0 * A.B * A.H * lq * lk * A.D
  fwd = lambda s: jax.jit(lambda q, k, v: mosaic.forward(q, k, v, mask, sm_scale=A.D ** -0.5, unpadded_o=True,
                                                         cfg=mosaic.MosaicConfig(kv_splits=s))[0])
  runs = [("split_default", fwd(None), flops), ("no_split", fwd(1), flops),
          ("flash_attention", A.attn_fns("pallas", None)[0], flops), ("cudnn", A.attn_fns("cudnn", None)[0], flops)]
  times = A._paired_rounds(print, f"decode {lq}x{lk}", runs, tuple(A.inputs(lq, lk)[:3]), 12, 10)
  import numpy as np  # noqa: E402
  for name in ("split_default", "no_split", "flash_attention"):
    print(f"decode {lq}x{lk} {name}: rate / cuDNN's, median of rounds "
          f"{np.median(np.asarray(times['cudnn']) / np.asarray(times[name])):.3f}x")
