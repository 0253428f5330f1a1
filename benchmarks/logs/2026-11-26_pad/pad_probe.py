"""Mosaic kernels alone at the TF step's lengths, inputs padded to the tile multiple (as before) or not (TMA
bounds): forward and backward of the TF self-attention (65,520 tokens) and the text cross-attention
(65,520 x 512). Run from the repo root: python3 benchmarks/logs/2026-11-26_pad/pad_probe.py"""
import sys
import jax, jax.numpy as jnp
sys.path.insert(0, "benchmarks")
import attention as A
import pallas_kernels.mosaic as M
from pallas_kernels import Mask

good_pad, good_out = M._pad_len, M._out_len
def padded(x, n, interpret):
  return x if x.shape[1] == n else jnp.pad(x, ((0, 0), (0, n - x.shape[1])) + ((0, 0),) * (x.ndim - 2))

cases = [("tf:21:3", A.tf_mask(21, 3)), ("cross:65520:512", Mask.full(65520, 512))]
for variant in ("none", "pad", "none", "pad"):
  M._pad_len, M._out_len = (good_pad, good_out) if variant == "none" else (padded, lambda l, p, i: p)
  for name, mask in cases:
    lq, lk = mask.shape
    q, k, v, do = A.inputs(lq, lk)[:4]
    s = A.D ** -0.5
    fwd = jax.jit(lambda q, k, v, mask=mask: M.forward(q, k, v, mask, sm_scale=s))
    o, lse = fwd(q, k, v)
    bwd = jax.jit(lambda q, k, v, o, lse, do, mask=mask: M.backward(q, k, v, o, lse, do, mask, sm_scale=s))
    tf = A.timeit(fwd, q, k, v) * 1e3
    tb = A.timeit(bwd, q, k, v, o, lse, do) * 1e3
    print(f"{variant:5s} {name:16s} fwd {tf:8.3f} ms  bwd {tb:8.3f} ms", flush=True)
