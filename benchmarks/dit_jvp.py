"""Wan2.1-1.3B-shaped DiT on one GPU: forward and forward+JVP (the TF-sCM tangent) through the Pallas attention.

  python3 benchmarks/dit_jvp.py --out $OUT            # on the GPU machine (random weights, bf16 compute)

1. Correctness: a small model with attention_impl="pallas" against "xla", output and jvp (head_dim 32 exercises
   the kernel's zero-padding of small head dims).
2. Timing: the teacher-forcing packed sequence [clean | noisy] of `--frames` latent frames of 1560 tokens
   (480p), frame-wise mask, params scanned over 30 layers; forward, and jax.jvp with tangents (v, 1) on the
   noisy half and 0 on the clean half, as TF-sCM builds them. Median of --iters timed calls after warm-up.
"""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from rcm_jax.models import build_model, masks


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check():
  out = {}
  for dtype in ("float32", "bfloat16"):
    kw = dict(dim=128, num_heads=4, num_layers=2, ffn_dim=256, in_channels=4, out_channels=4, text_dim=32,
              freq_dim=64, patch_size=(1, 2, 2), dtype=dtype)
    mp, mx = build_model("small", attention_impl="pallas", **kw), build_model("small", attention_impl="xla", **kw)
    r = np.random.default_rng(0)
    x = jnp.asarray(r.standard_normal((2, 8, 16, 16, 4)), jnp.float32)
    tx = jnp.asarray(r.standard_normal(x.shape), jnp.float32)
    t = jnp.asarray(r.uniform(size=(2, 8)), jnp.float32)
    ctx = jnp.asarray(r.standard_normal((2, 5, 32)), jnp.float32)
    mask = masks.teacher_forcing(4, 64, first_chunk_frames=1, chunk_frames=1)
    fpos = jnp.concatenate([jnp.arange(4), jnp.arange(4)])
    params = mx.init(jax.random.key(0), x, t, context=ctx)
    params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape), params)
    f = lambda m: jax.jit(lambda x, t: jax.jvp(lambda x, t: m.apply(params, x, t, context=ctx, mask=mask,
                                                                     frame_positions=fpos),
                                                (x, t), (tx, jnp.ones_like(t))))
    (op, dp), (ox, dx) = f(mp)(x, t), f(mx)(x, t)
    out[dtype] = {"out_rel_err": rel(op, ox), "jvp_rel_err": rel(dp, dx)}
  return out


def bench(frames, iters):
  tpf = 1560
  model = build_model("wan_1p3b", attention_impl="pallas", dtype="bfloat16", scan_layers=True)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1, 2, 2, 16)), jnp.zeros((1, 1)),
                               context=jnp.zeros((1, 1, 4096)))
  params = jax.tree.map(lambda p: p + 0.01 * jax.random.normal(jax.random.key(1), p.shape, p.dtype), params)
  r = np.random.default_rng(0)
  x = jnp.asarray(r.standard_normal((1, 2 * frames, 60, 104, 16)), jnp.float32)   # [clean | noisy]
  t = jnp.concatenate([jnp.zeros((1, frames)), jnp.full((1, frames), 0.7)], axis=1)
  ctx = jnp.asarray(r.standard_normal((1, 512, 4096)), jnp.float32)
  tx = jnp.concatenate([jnp.zeros_like(x[:, :frames]), jnp.asarray(r.standard_normal(x[:, frames:].shape),
                                                                    jnp.float32)], axis=1)
  tt = jnp.concatenate([jnp.zeros((1, frames)), jnp.ones((1, frames))], axis=1)
  mask = masks.teacher_forcing(frames, tpf, first_chunk_frames=1, chunk_frames=1)
  fpos = jnp.concatenate([jnp.arange(frames), jnp.arange(frames)])
  # params, context and tangents are arguments, never closed over (constants would be folded at compile time)
  apply = lambda p, c, x, t: model.apply(p, x, t, context=c, mask=mask, frame_positions=fpos)
  fwd = jax.jit(apply)
  jvp = jax.jit(lambda p, c, x, t, tx, tt: jax.jvp(lambda x, t: apply(p, c, x, t), (x, t), (tx, tt)))
  fns = {"forward": lambda: fwd(params, ctx, x, t), "forward+jvp": lambda: jvp(params, ctx, x, t, tx, tt)}
  res = {"tokens": 2 * frames * tpf, "mask_density": mask.density()}
  for name, fn in fns.items():
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(iters):
      t0 = time.perf_counter()
      o = fn()
      jax.block_until_ready(o)
      times.append(time.perf_counter() - t0)
    finite = bool(all(np.isfinite(np.asarray(a, np.float32)).all() for a in jax.tree.leaves(o)))
    res[name] = {"median_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * min(times),
                 "first_call_s": compile_s, "finite": finite}
    print(name, res[name], flush=True)
  res["peak_gb"] = jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0) / 2**30
  return res


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=".")
  ap.add_argument("--frames", type=int, nargs="+", default=[7, 21])
  ap.add_argument("--iters", type=int, default=5)
  a = ap.parse_args()
  result = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "check": check()}
  print(json.dumps(result["check"]), flush=True)
  for f in a.frames:
    result[f"frames_{f}"] = bench(f, a.iters)
  with open(os.path.join(a.out, "dit_jvp.json"), "w") as fh:
    json.dump(result, fh, indent=2)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
