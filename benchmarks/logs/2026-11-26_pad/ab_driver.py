"""The one-off A/B driver of this log directory (2026-11-26, session 6).

AB=pad restores the padded Mosaic path (every kernel input padded to the tile multiple and every output
sliced back, as before this session; calls 2 and 4 ran an earlier form of the new code whose forward output
was unpadded too); FUSED=1 switches on `MosaicBwdConfig(fused_dq=True)`. Then runs SCRIPT
(default benchmarks/train_step.py) with the given arguments. Run from the repo root, e.g.
  AB=pad python3 benchmarks/logs/2026-11-26_pad/ab_driver.py --recipes tf --remat attention_out_only
"""
import os, runpy, sys
import jax.numpy as jnp
import pallas_kernels.mosaic as M
old = set(filter(None, os.environ.get("AB", "").split(",")))
if "pad" in old:
  M._pad_len = lambda x, n, interpret: x if x.shape[1] == n else jnp.pad(
      x, ((0, 0), (0, n - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
  M._out_len = lambda length, padded, interpret: padded
if os.environ.get("FUSED"):
  M.backward.__kwdefaults__["cfg"] = M.MosaicBwdConfig(fused_dq=True)
print("AB old:", sorted(old), "fused:", bool(os.environ.get("FUSED")), flush=True)
script = os.environ.get("SCRIPT", "benchmarks/train_step.py")
sys.argv = [script] + sys.argv[1:]
sys.path.insert(0, "benchmarks")
runpy.run_path(script, run_name="__main__")
