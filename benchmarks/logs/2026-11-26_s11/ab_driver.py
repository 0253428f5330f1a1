"""The one-off A/B driver of this log directory (2026-11-26, session 7).

AB=pado makes every Mosaic forward write its o padded to the tile multiple and slice it (`unpadded_o` off),
as before `mosaic.forward(unpadded_o=)`: the A/B for the plain forwards of `flash_attention` and
`flash_attention_stacked`. AB=rope restores the RoPE written as a stack of the rotated halves. AB=qkv restores the fused q/k/v
projection whose backward concatenates the three cotangents (before `layers.fused_linears`). AB=slot puts every
streamed chunk in the scratch rows (no chunk in its empty slot: each written chunk is moved after the call). Then runs SCRIPT (default benchmarks/train_step.py) with the given arguments.
Run from the repo root, e.g.
  AB=pado SCRIPT=benchmarks/attention.py python3 benchmarks/logs/2026-11-26_s11/ab_driver.py --bench ...
"""
import functools, os, runpy, sys
import pallas_kernels.mosaic as M
old = set(filter(None, os.environ.get("AB", "").split(",")))
if "pado" in old:
  _forward = M.forward
  @functools.wraps(_forward)
  def forward(*args, **kwargs):
    kwargs["unpadded_o"] = False
    return _forward(*args, **kwargs)
  M.forward = forward
if "rope" in old:
  import jax.numpy as jnp
  import rcm_jax.models.layers as layers

  def apply_rope(x, cos, sin):
    acc = jnp.promote_types(x.dtype, jnp.float32)
    b, length, h, d = x.shape
    pairs = x.astype(acc).reshape(b, length, h, d // 2, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    c = cos.astype(acc)[None, :, None, :]
    s = sin.astype(acc)[None, :, None, :]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return out.reshape(b, length, h, d).astype(x.dtype)
  layers.apply_rope = apply_rope
if "qkv" in old:
  import jax
  import jax.numpy as jnp
  import rcm_jax.models.layers as layers

  def _qkv_linear(self, x):
    if self.is_initializing():
      return self.to_q(x), self.to_k(x), self.to_v(x)
    dt = self.config.compute_dtype
    ps = [m.variables["params"] for m in (self.to_q, self.to_k, self.to_v)]
    kernel = jnp.concatenate([p["kernel"] for p in ps], axis=1).astype(dt)
    bias = jnp.concatenate([p["bias"] for p in ps]).astype(dt)
    y = jax.lax.dot_general(x.astype(dt), kernel, (((x.ndim - 1,), (0,)), ((), ()))) + bias
    return jnp.split(y, 3, axis=-1)
  layers.WanAttention._qkv_linear = _qkv_linear
if "slot" in old:
  import dataclasses
  import rcm_jax.inference.rollout as rollout
  _geometry = rollout.chunk_geometry

  def chunk_geometry(plan, i, tokens_per_frame, buffer_tokens=None):
    g = _geometry(plan, i, tokens_per_frame, buffer_tokens)
    if not g.in_slot:
      return g
    s = plan.cache_frames * tokens_per_frame
    return dataclasses.replace(g, in_slot=False, chunk_at=s,
                               mask=plan.mask(i, tokens_per_frame, key_len=buffer_tokens, chunk_at=s))
  rollout.chunk_geometry = chunk_geometry
print("AB old:", sorted(old), flush=True)
script = os.environ.get("SCRIPT", "benchmarks/train_step.py")
sys.argv = [script] + sys.argv[1:]
sys.path.insert(0, "benchmarks")
runpy.run_path(script, run_name="__main__")
