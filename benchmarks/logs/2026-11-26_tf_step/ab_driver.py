"""The one-off A/B driver of this log directory (2026-11-26), kept with its logs.

AB=gelu,delta,bk,split,qkv restores the old behaviour of each named change by monkeypatching (FUSED=1 switches
on `MosaicBwdConfig(fused_dq=True)`), then runs SCRIPT
(default benchmarks/train_step.py) with the given arguments. Run from the repo root, e.g.
  AB=gelu,delta,bk python3 benchmarks/logs/2026-11-26_tf_step/ab_driver.py --recipes tf --remat attention_out_only
"""
import os, runpy, sys
import jax.numpy as jnp
import flax.linen as nn
old = set(filter(None, os.environ.get("AB", "").split(",")))
import rcm_jax.models.layers as L
import pallas_kernels.mosaic as M
if "gelu" in old:
  L.gelu_tanh = lambda x: nn.gelu(x, approximate=True)
if "delta" in old:
  M.softmax_delta = lambda o, do: jnp.einsum("blhd,blhd->bhl", o.astype(jnp.float32), do.astype(jnp.float32))
if "bk" in old or "split" in old:
  M.backward.__kwdefaults__["cfg"] = M.MosaicBwdConfig(dq_block_k=64 if "bk" in old else 128,
                                                       dkdv_splits=1 if "split" in old else None)
if os.environ.get("FUSED"):   # the other way round: a new option switched on
  M.backward.__kwdefaults__["cfg"] = M.MosaicBwdConfig(fused_dq=True)
if "qkv" in old:
  L.WanAttention._qkv_linear = lambda self, x: (self.to_q(x), self.to_k(x), self.to_v(x))
print("AB old:", sorted(old), flush=True)
script = os.environ.get("SCRIPT", "benchmarks/train_step.py")
sys.argv = [script] + sys.argv[1:]
sys.path.insert(0, "benchmarks")
runpy.run_path(script, run_name="__main__")
