"""GPU benchmark and correctness check of `pallas_kernels.flash_attention` (Triton and Mosaic kernels), with peers.

  python benchmarks/attention.py --check --bench --out /tmp/attn   # what RESULTS.md records
  python benchmarks/attention.py --tune                            # block-size sweep at L=16384, dense
  python benchmarks/attention.py --backend mosaic --check --bench --modes fwd,fb --out /tmp/attn
      # Mosaic GPU kernels (Hopper) beside Mosaic fwd + Triton bwd, Triton and cuDNN in the same process
  python benchmarks/attention.py --mosaic-jvp-tune   # the fused forward+JVP alone: Mosaic vs Triton
  python benchmarks/attention.py --mosaic-bwd-tune   # the backward kernels alone: Mosaic configs vs Triton
                                                     # (with and without the consumers' ping-pong)
  python benchmarks/attention.py --mosaic-persistent-tune   # the forward: one CTA per tile vs persistent CTAs
  python benchmarks/attention.py --paired-shares   # flash_attention: masked fwd+bwd share of dense, and rates
                                                   # against cuDNN, in paired rounds
  python benchmarks/attention.py --mosaic-mask-tune   # masked share of dense in paired rounds; single-run
                                                      # tile masks and persistent CTAs against the code before

Reports TFLOP/s at B=1, H=12, D=128, bf16 for forward, forward+backward and forward+JVP, dense and with
the Wan teacher-forcing mask (1560 tokens per latent frame, frame-wise c1-1 and chunk-wise c3-3), beside
`jax.nn.dot_product_attention(implementation="cudnn")` (fwd, fwd+bwd) and XLA `jax.jvp` where it fits;
plus the streaming decode case (one chunk of queries against a KV cache). FLOPs: forward
4 B H Lq Lk D x mask density, fwd+bwd 3.5x, fwd+JVP 3x. `tile` columns count the FLOPs of every tile the
kernel computes (computed-tile fraction instead of density): the rate on the tiles actually run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pallas_kernels as pk  # noqa: E402
from pallas_kernels import Mask, reference  # noqa: E402
from pallas_kernels.attention import resolve_backend  # noqa: E402
from pallas_kernels.mask import tile_schedule  # noqa: E402
from rcm_jax.models import masks as video  # noqa: E402

TOKENS_PER_FRAME = 1560
B, H, D = 1, 12, 128
BACKEND = None  # kernels of the "pallas" rows (--backend); None = RCM_FLASH_BACKEND / auto


def timeit(fn, *args, reps=10, warmup=2):
  """Median wall time per call (s) of a jitted fn; each sample blocks on the result."""
  out = None
  for _ in range(warmup):
    out = fn(*args)
  jax.block_until_ready(out)
  samples = []
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t) / reps)
  return float(np.median(samples))


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if not np.isfinite(a).all():
    return float("nan")
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def inputs(lq, lk, dtype=jnp.bfloat16, seed=0, h=H, hkv=H, d=D):
  ks = jax.random.split(jax.random.key(seed), 6)
  shp_q, shp_k = (B, lq, h, d), (B, lk, hkv, d)
  return [jax.random.normal(kk, s, dtype) for kk, s in zip(ks, [shp_q, shp_k, shp_k, shp_q, shp_k, shp_k])]


def attn_fns(impl, mask, block_sizes=None):
  """(fwd, fwd+bwd, fwd+jvp) jitted closures for one implementation."""
  if impl == "pallas":
    f = lambda q, k, v: pk.flash_attention(q, k, v, mask, block_sizes=block_sizes, backend=BACKEND)
  elif impl in ("triton", "mosaic_fwd"):  # peers of a --backend mosaic run (Triton; Mosaic fwd + Triton bwd)
    f = lambda q, k, v: pk.flash_attention(q, k, v, mask, block_sizes=block_sizes, backend=impl)
  elif impl == "cudnn":
    dense = None if mask is None else jnp.asarray(mask.to_dense())[None, None]
    f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=dense, implementation="cudnn")
  else:
    f = lambda q, k, v: reference.attention(q, k, v, mask)
  fwd = jax.jit(f)
  fb = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), (0, 1, 2)))
  jv = jax.jit(lambda q, k, v, tq, tk, tv: jax.jvp(f, (q, k, v), (tq, tk, tv)))
  return fwd, fb, jv


# ---------------------------------------------------------------------------------------------------
# Correctness on the GPU: compiled Triton kernels against the XLA reference in float32.
# ---------------------------------------------------------------------------------------------------

def check(log, scm=True, only=None, jvp=True):
  cases = [
      ("dense ragged GQA", None, 1000, 1000, 4, 2, jnp.bfloat16),
      ("TF c1-1 5 fr x 100 tok", video.teacher_forcing(5, 100, first_chunk_frames=1, chunk_frames=1),
       1000, 1000, 4, 4, jnp.bfloat16),
      ("TF c3-3 window+sink", video.teacher_forcing(7, 90, first_chunk_frames=1, chunk_frames=3, local_blocks=2,
                                                    sink_blocks=1), 1260, 1260, 2, 1, jnp.bfloat16),
      ("block-causal f32", video.block_causal(6, 130, first_chunk_frames=2, chunk_frames=2), 780, 780, 2, 2,
       jnp.float32),
      ("dense random mask", Mask.from_dense(np.random.default_rng(1).random((300, 500)) < 0.4), 300, 500, 2, 1,
       jnp.bfloat16),
      ("dense D=64 L=2048", None, 2048, 2048, 2, 2, jnp.bfloat16),
      ("empty rows + 2 intervals", Mask.from_ranges(700, 900, [(100, 700, 0, 130), (100, 400, 300, 650),
                                                                (400, 700, 500, 900)]), 700, 900, 2, 1, jnp.bfloat16),
      ("decode split-KV 1560 x 16380", None, 1560, 16380, 2, 1, jnp.bfloat16),   # 26 items: kv_splits 5
      # (the cases above mask a partial tile by one range a row; here two intervals share key tiles)
      ("2 intervals in one tile", Mask.from_ranges(700, 900, [(100, 700, 0, 70), (100, 400, 100, 190),
                                                              (400, 700, 150, 900)]), 700, 900, 2, 1, jnp.bfloat16),
  ]
  ok = True
  for case in cases:
    if only and not any(o in case[0] for o in only):
      continue
    try:
      with jax.default_matmul_precision("highest"):  # reference in true f32 (kernels set their own)
        ok &= _check_case(log, *case, jvp=jvp)
    except Exception as e:  # noqa: BLE001  (keep going: one log holds every failure)
      ok = False
      log(f"check {case[0]:26s} raised {type(e).__name__}: {str(e)[:1500]}")
  try:
    ok &= check_scm_checkpoint(log) if scm else True
  except Exception as e:  # noqa: BLE001
    ok = False
    log(f"check sCM/checkpoint raised {type(e).__name__}: {str(e)[:1500]}")
  return ok


def check_scm_checkpoint(log):
  """sCM pattern (grad of a loss holding a jvp at stop-gradient'ed params/inputs) under jax.checkpoint."""
  mask = video.teacher_forcing(3, 200, first_chunk_frames=1, chunk_frames=1)
  l, e = mask.shape[0], 256
  ks = jax.random.split(jax.random.key(3), 3)
  w = jax.random.normal(ks[0], (4, e, e), jnp.float32) / 16
  x = jax.random.normal(ks[1], (1, l, e), jnp.float32)
  tx = jax.random.normal(ks[2], (1, l, e), jnp.float32)

  def grad_fn(impl):
    def net(w, x):
      qkv = [(x @ w[i]).astype(jnp.bfloat16).reshape(1, l, 2, 128) for i in range(3)]
      o = jax.checkpoint(lambda q, k, v: pk.flash_attention(q, k, v, mask, implementation=impl))(*qkv)
      return o.astype(jnp.float32).reshape(1, l, e) @ w[3]

    def loss(w):
      sw, sx = jax.lax.stop_gradient(w), jax.lax.stop_gradient(x)
      v_sg, dv = jax.jvp(lambda x: net(sw, x), (sx,), (tx,))
      g = jax.lax.stop_gradient(-(v_sg - x) - 0.7 * dv)
      v = net(w, x)
      return jnp.sum((v - jax.lax.stop_gradient(v) - g) ** 2)
    return jax.jit(jax.grad(loss))

  jax.config.update("jax_remat3", True)
  err = rel(grad_fn("pallas")(w), grad_fn("xla")(w))
  log(f"check sCM grad under checkpoint vs xla: rel={err:.1e}" + ("  OK" if err < 3e-2 else "  FAIL"))
  return err < 3e-2


def _check_case(log, name, mask, lq, lk, h, hkv, dtype, jvp=True):
  d = 64 if "D=64" in name else D
  # --backend mosaic checks every case: "auto" runs Mosaic where it applies and Triton elsewhere (f32,
  # dense element masks); the log names the forward kernel each case ran.
  backend = "auto" if BACKEND == "mosaic" else BACKEND
  fwd_kernel = resolve_backend(backend, dtype, d, mask or Mask.full(lq, lk), lq, lk, False)
  q, k, v, tq, tk, tv = inputs(lq, lk, dtype, seed=hash(name) % 1000, h=h, hkv=hkv, d=d)
  ct = jax.random.normal(jax.random.key(7), q.shape, jnp.float32)
  f32 = lambda *a: [x.astype(jnp.float32) for x in a]
  f = lambda q, k, v: pk.flash_attention(q, k, v, mask, backend=backend)
  o = jax.jit(f)(q, k, v)
  ro = jax.jit(lambda q, k, v: reference.attention(*f32(q, k, v), mask))
  g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * ct), (0, 1, 2)))(q, k, v)
  rg = jax.jit(jax.grad(lambda q, k, v: jnp.sum(reference.attention(q, k, v, mask) * ct), (0, 1, 2)))(
      *f32(q, k, v))
  errs = dict(o=rel(o, ro(q, k, v)), dq=rel(g[0], rg[0]), dk=rel(g[1], rg[1]), dv=rel(g[2], rg[2]))
  if jvp:  # the fused forward+JVP kernel (Mosaic under --backend mosaic where it applies, else Triton)
    oj, tj = jax.jit(lambda *a: jax.jvp(f, a[:3], a[3:]))(q, k, v, tq, tk, tv)
    rj = jax.jit(lambda *a: jax.jvp(lambda q, k, v: reference.attention(q, k, v, mask), a[:3], a[3:]))(
        *f32(q, k, v, tq, tk, tv))
    errs.update(jvp_o=rel(oj, rj[0]), jvp_t=rel(tj, rj[1]))
  tol = 2e-2 if dtype == jnp.bfloat16 else 2e-3
  good = all(e < tol for e in errs.values())
  log(f"check {name:26s} {jnp.dtype(dtype).name:8s} fwd={fwd_kernel:6s} "
      + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
      + ("  OK" if good else "  FAIL"))
  return good


# ---------------------------------------------------------------------------------------------------
# Throughput.
# ---------------------------------------------------------------------------------------------------

def bench_case(label, mask, lq, lk, log, results, peers=True, xla_jvp=True, block_sizes=None, modes=("fwd", "fb", "jvp")):
  density = 1.0 if mask is None else mask.density()
  m = mask if mask is not None else Mask.full(lq, lk)
  bs = block_sizes or pk.BlockSizes()
  fracs = {}  # computed-tile fraction under each mode's main kernel tiles
  for mode, cfg in (("fwd", bs.fwd), ("fb", bs.bwd_dq), ("jvp", bs.jvp)):
    pad = max(c.block_q for c in bs.all()), max(c.block_k for c in bs.all())
    fracs[mode] = tile_schedule(m, -(-lq // pad[0]) * pad[0], -(-lk // pad[1]) * pad[1], cfg.block_q,
                                cfg.block_k).computed_fraction()
  base = 4.0 * B * H * lq * lk * D
  q, k, v, tq, tk, tv = inputs(lq, lk)
  impls = (["pallas"] + (["mosaic_fwd", "triton"] if BACKEND == "mosaic" else []) + (["cudnn"] if peers else [])
           + (["xla"] if xla_jvp else []))
  for impl in impls:
    try:
      fwd, fb, jv = attn_fns(impl, mask, block_sizes if impl in ("pallas", "triton") else None)
    except Exception as e:  # noqa: BLE001
      log(f"{label} {impl}: setup failed {type(e).__name__}: {str(e)[:200]}")
      continue
    for mode, fn, args, mult in (("fwd", fwd, (q, k, v), 1.0), ("fb", fb, (q, k, v), 3.5),
                                 ("jvp", jv, (q, k, v, tq, tk, tv), 3.0)):
      if mode not in modes or (impl == "cudnn" and mode == "jvp") or (impl == "xla" and mode != "jvp"):
        continue
      if impl == "mosaic_fwd" and mode != "fb":  # its forward is --backend mosaic's, its JVP Triton's
        continue
      try:
        t = timeit(fn, *args, reps=3 if lq * lk > 2e9 else 10)
      except Exception as e:  # noqa: BLE001
        log(f"{label:34s} {impl:6s} {mode:4s} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        continue
      frac = fracs[mode]
      tf = base * mult * density / t / 1e12
      tile_tf = base * mult * frac / t / 1e12
      name = BACKEND if (impl == "pallas" and BACKEND) else impl
      row = dict(label=label, impl=name, mode=mode, lq=lq, lk=lk, density=density, tile_frac=frac,
                 ms=t * 1e3, tflops=tf, tile_tflops=tile_tf)
      results.append(row)
      log(f"{label:34s} {name:10s} {mode:4s} {t*1e3:9.3f} ms  {tf:7.1f} TFLOP/s  (tiles {tile_tf:7.1f}; "
          f"density {density:.3f}, tiles {frac:.3f})")


def tf_mask(frames, chunk):
  first = 1 if chunk == 1 else chunk
  return video.teacher_forcing(frames, TOKENS_PER_FRAME, first_chunk_frames=first, chunk_frames=chunk)


TF_CASES = ((1, 1), (5, 1), (21, 1), (3, 3), (6, 3), (21, 3))  # (latent frames, chunk frames)


def bench(log, results, sizes, block_sizes=None, modes=("fwd", "fb", "jvp"), decode=True, tf_cases=TF_CASES):
  xla = "jvp" in modes
  for L in sizes:
    bench_case(f"dense L={L}", None, L, L, log, results, xla_jvp=xla and L <= 8192, block_sizes=block_sizes,
               modes=modes)
  # Teacher forcing: packed [clean | noisy] of F latent frames, L = 2 F 1560 (frame-aligned near the
  # dense sizes: F = 1, 5, 21 frame-wise -> 3120, 15600, 65520; F = 3, 6, 21 chunk-wise -> 9360, 18720, 65520).
  for frames, chunk in tf_cases:
    mask = tf_mask(frames, chunk)
    L = mask.shape[0]
    if sizes and (L > max(sizes) + 1000 or L < min(sizes) - 1000):
      continue
    bench_case(f"TF {'c1-1' if chunk == 1 else 'c3-3'} F={frames} L={L}", mask, L, L, log, results,
               peers=L <= 18720, xla_jvp=xla and L <= 9360, block_sizes=block_sizes, modes=modes)
  # Streaming decode: one chunk of queries against a KV cache (cache + the chunk), forward only.
  for lq in ((1560, 4680) if decode else ()):
    for lk in (16380, 32760):
      bench_case(f"decode Lq={lq} Lk={lk}", None, lq, lk, log, results, xla_jvp=False, block_sizes=block_sizes,
                 modes=("fwd",))


def mosaic_tune(log, results, L=16384):
  """The Mosaic forward kernel alone at dense L for a few (block_k, stages) configs."""
  from pallas_kernels import mosaic  # noqa: PLC0415
  q, k, v = inputs(L, L)[:3]
  mask = Mask.full(L, L)
  for bk, stages in ((128, 2), (64, 3), (64, 4)):  # (128, 3) needs 234 KB > 227 KB of shared memory
    cfg = mosaic.MosaicConfig(bk, stages)
    fn = jax.jit(lambda q, k, v, cfg=cfg: mosaic.forward(q, k, v, mask, sm_scale=D ** -0.5, cfg=cfg))
    try:
      t = timeit(fn, q, k, v)
    except Exception as e:  # noqa: BLE001
      log(f"mosaic tune block_k={bk} stages={stages}: failed {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      continue
    tf = 4.0 * B * H * L * L * D / t / 1e12
    results.append(dict(label=f"mosaic tune L={L}", impl="mosaic", mode="fwd", block_k=bk, stages=stages,
                        ms=t * 1e3, tflops=tf))
    log(f"mosaic tune L={L} block_k={bk:3d} stages={stages}: {t*1e3:8.3f} ms {tf:7.1f} TFLOP/s")


def mosaic_persistent_tune(log, results, cases=("dense:4096", "dense:16384", "tf:5:1", "tf:6:3", "tf:21:3",
                                                "cross:65520:512"), ctas=(0, 132, 264)):
  """The Mosaic forward alone with one CTA per work item (0) and with persistent CTAs (132: one per H100 SM),
  dense and under teacher-forcing masks whose rows see few key tiles (15,600 and 18,720 tokens). Rates count
  masked work by density."""
  from pallas_kernels import mosaic  # noqa: PLC0415
  for case in cases:
    mask = _case_mask(case)
    lq, lk = mask.shape
    q, k, v = inputs(lq, lk)[:3]
    runs = [(f"persistent_ctas={n}", jax.jit(lambda q, k, v, n=n: mosaic.forward(
        q, k, v, mask, sm_scale=D ** -0.5, cfg=mosaic.MosaicConfig(persistent_ctas=n)))) for n in ctas]
    flops = 4.0 * B * H * lq * lk * D * mask.density()
    _time_runs(log, results, f"fwd persistent {case}", "fwd", runs, (q, k, v), flops)


def _case_mask(case: str) -> Mask:
  """"dense:L", "cross:LQ:LK" (no mask, LQ queries over LK keys: the Wan text cross-attention is
  cross:65520:512) or "tf:FRAMES:CHUNK" (a teacher-forcing mask) -> the Mask."""
  kind, *rest = case.split(":")
  if kind == "dense":
    return Mask.full(int(rest[0]), int(rest[0]))
  if kind == "cross":
    return Mask.full(int(rest[0]), int(rest[1]))
  return tf_mask(int(rest[0]), int(rest[1]))


def _time_runs(log, results, label, mode, runs, args, flops):
  """Time each (name, jitted fn) of `runs` on `args`; log and record its rate at `flops` per call."""
  for name, fn in runs:
    try:
      t = timeit(fn, *args)
    except Exception as e:  # noqa: BLE001
      log(f"{label} {name}: failed {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      continue
    tf = flops / t / 1e12
    results.append(dict(label=label, impl=name, mode=mode, ms=t * 1e3, tflops=tf))
    log(f"{label:24s} {name:90s} {t*1e3:8.3f} ms {tf:7.1f} TFLOP/s")


def mosaic_bwd_tune(log, results, cases=("dense:16384", "tf:21:3")):
  """The backward kernels alone (dq + dk/dv, given o, lse2 and dO): Mosaic for a few configs beside Triton's
  default pair. Rates count the backward as 2.5x the forward FLOPs, masked work by density."""
  from pallas_kernels import kernels, mosaic  # noqa: PLC0415
  from pallas_kernels.attention import _pad, _Plan  # noqa: PLC0415
  cfgs = (mosaic.MosaicBwdConfig(), mosaic.MosaicBwdConfig(fused_dq=True), mosaic.MosaicBwdConfig(pingpong=True),
          mosaic.MosaicBwdConfig(dq_block_k=64), mosaic.MosaicBwdConfig(dkdv_splits=1))
  for case in cases:
    mask = _case_mask(case)
    lq, lk = mask.shape
    q, k, v, do = inputs(lq, lk)[:4]
    o, lse = jax.jit(lambda q, k, v: mosaic.forward(q, k, v, mask, sm_scale=D ** -0.5))(q, k, v)
    flops = 2.5 * 4.0 * B * H * lq * lk * D * mask.density()
    plan = _Plan(mask, lq, lk, D ** -0.5, pk.BlockSizes(), False, "triton")
    runs = [("triton", jax.jit(lambda q, k, v, o, lse, do: kernels.backward(
        *plan.padded(q, k, v), _pad(o, plan.lq_pad), lse, _pad(do, plan.lq_pad), plan.sched(plan.dq),
        plan.sched(plan.dkdv), plan.dq, plan.dkdv,
        sm_scale=D ** -0.5, interpret=False)))]
    runs += [(str(c), jax.jit(lambda q, k, v, o, lse, do, c=c: mosaic.backward(q, k, v, o, lse, do, mask,
                                                                                sm_scale=D ** -0.5, cfg=c)))
             for c in cfgs]
    _time_runs(log, results, f"bwd tune {case}", "bwd", runs, (q, k, v, o, lse, do), flops)
    ref = runs[1][1](q, k, v, o, lse, do)   # every config's gradients against the default config's
    for name, fn in runs[2:]:
      got = fn(q, k, v, o, lse, do)
      log(f"bwd tune {case} {name}: rel. difference to the default dq/dk/dv "
          + " / ".join(f"{rel(a, b):.1e}" for a, b in zip(got, ref)))


def mosaic_jvp_tune(log, results, cases=("dense:16384", "tf:21:1")):
  """The fused forward+JVP kernels alone (all three tangents): Mosaic beside Triton's default. Rates count
  the JVP as 3x the forward FLOPs, masked work by density."""
  from pallas_kernels import kernels, mosaic  # noqa: PLC0415
  from pallas_kernels.attention import _pad, _Plan  # noqa: PLC0415
  for case in cases:
    mask = _case_mask(case)
    L = mask.shape[0]
    args = inputs(L, L)
    flops = 3.0 * 4.0 * B * H * L * L * D * mask.density()
    plan = _Plan(mask, L, L, D ** -0.5, pk.BlockSizes(), False, "triton")
    runs = [("triton", jax.jit(lambda q, k, v, tq, tk, tv: kernels.forward_jvp(
        *plan.padded(q, k, v), _pad(tq, plan.lq_pad), _pad(tk, plan.lk_pad), _pad(tv, plan.lk_pad),
        plan.sched(plan.jvp), plan.jvp, sm_scale=D ** -0.5, interpret=False))),
        ("mosaic", jax.jit(lambda *a: mosaic.forward_jvp(*a, mask, sm_scale=D ** -0.5)))]
    _time_runs(log, results, f"jvp tune {case}", "jvp", runs, args, flops)


def _traced_with(fn, **flags):
  """fn jitted, traced with the given `pallas_kernels.mosaic` module switches set (they are read at trace time)."""
  from pallas_kernels import mosaic  # noqa: PLC0415

  def traced(*args):
    old = {name: getattr(mosaic, name) for name in flags}
    for name, value in flags.items():
      setattr(mosaic, name, value)
    try:
      return fn(*args)
    finally:
      for name, value in old.items():
        setattr(mosaic, name, value)

  return jax.jit(traced)


def _paired_rounds(log, label, runs, args, rounds, reps):
  """Time each (name, jitted fn, flops) of `runs` on `args` in `rounds` rounds, the run order rotated each round,
  `reps` calls a sample. Returns {name: [seconds per call, one per round]}: compare runs by their ratios within a
  round, which cancel the card's clock drifting over the minutes of a long A/B."""
  times = {name: [] for name, _, _ in runs}
  for _, fn, _ in runs:
    jax.block_until_ready(fn(*args))   # compile and warm up every run first
  for r in range(rounds):
    shift = r % len(runs)
    for name, fn, _ in runs[shift:] + runs[:shift]:
      out = fn(*args)
      jax.block_until_ready(out)
      t = time.perf_counter()
      for _ in range(reps):
        out = fn(*args)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t) / reps)
  for name, _, flops in runs:
    ts = np.asarray(times[name])
    log(f"{label:26s} {name:18s} median {np.median(ts)*1e3:8.3f} ms  {flops / np.median(ts) / 1e12:7.1f} TFLOP/s  "
        f"(rounds {ts.min()*1e3:.3f}-{ts.max()*1e3:.3f} ms)")
  return times


def mosaic_mask_tune(log, results, cases=("tf:5:1", "tf:6:3", "tf:21:1"), rounds=12, reps=10):
  """Issue 3's masked share of dense, and the kernels' options for masks whose rows see few key tiles against
  the code before them: the three Mosaic kernels alone on one teacher-forcing case and on dense attention of
  the same length (same q, k, v), in paired rounds (`_paired_rounds`). Options: `mosaic.SINGLE_RUN` (partial
  tiles masked by one range a row) and, for the forward, persistent CTAs (`MosaicConfig.persistent_ctas`, its
  default rule against one CTA per item). Rates are tile rates (FLOPs of every computed 128 x 128 tile);
  `share` is the median over rounds of a run's tile rate over dense's in the same round, `vs default` the
  median time ratio."""
  from pallas_kernels import mosaic  # noqa: PLC0415
  one_cta = mosaic.MosaicConfig(persistent_ctas=0)
  for case in cases:
    mask = _case_mask(case)
    lq, lk = mask.shape
    dense = Mask.full(lq, lk)
    q, k, v, tq, tk, tv = inputs(lq, lk)
    do = tq   # (any array of q's shape)
    frac = tile_schedule(mask, -(-lq // 128) * 128, -(-lk // 128) * 128, 128, 128).computed_fraction()
    flops = 4.0 * B * H * lq * lk * D
    fwd = lambda m, cfg=mosaic.MosaicConfig(): (lambda q, k, v: mosaic.forward(q, k, v, m, sm_scale=D ** -0.5,
                                                                               cfg=cfg, unpadded_o=True))
    bwd = lambda m: (lambda q, k, v, o, lse, do: mosaic.backward(q, k, v, o, lse, do, m, sm_scale=D ** -0.5))
    jvp = lambda m: (lambda *a: mosaic.forward_jvp(*a, m, sm_scale=D ** -0.5))
    o, lse = jax.jit(fwd(mask))(q, k, v)
    o_d, lse_d = jax.jit(fwd(dense))(q, k, v)
    kernels = [
        ("fwd", 1.0, (q, k, v), fwd, [("before", dict(SINGLE_RUN=False, cfg=one_cta)),
                                      ("one_cta_per_item", dict(cfg=one_cta)),
                                      ("general_mask", dict(SINGLE_RUN=False))]),
        ("bwd", 2.5, (q, k, v, o, lse, do), bwd, [("before", dict(SINGLE_RUN=False))]),
        ("jvp", 3.0, (q, k, v, tq, tk, tv), jvp, [("before", dict(SINGLE_RUN=False))]),
    ]
    for mode, mult, args, make, options in kernels:
      dense_args = (q, k, v, o_d, lse_d, do) if mode == "bwd" else args
      runs = [("dense", _traced_with(make(dense)), flops * mult),
              ("default", _traced_with(make(mask)), flops * mult * frac)]
      for name, opt in options:
        opt = dict(opt)
        cfg = opt.pop("cfg", None)
        runs.append((name, _traced_with(make(mask, cfg) if cfg else make(mask), **opt), flops * mult * frac))
      # dense runs on its own o / lse (bwd): one argument tuple per run
      wrapped = [(n, (lambda f, a: (lambda *_: f(*a)))(f, dense_args if n == "dense" else args), fl)
                 for n, f, fl in runs]
      label = f"{mode} {case} L={lq}"
      times = _paired_rounds(log, label, wrapped, (), rounds, reps)
      t_dense, t_def = np.asarray(times["dense"]), np.asarray(times["default"])
      for name, _, fl in runs:
        t = np.asarray(times[name])
        share = float(np.median((fl / t) / (flops * mult / t_dense)))
        vs = float(np.median(t / t_def))
        results.append(dict(label=label, impl=name, mode=mode, ms=float(np.median(t)) * 1e3,
                            tile_tflops=fl / float(np.median(t)) / 1e12, share_of_dense=share, time_vs_default=vs,
                            rounds_ms=[x * 1e3 for x in times[name]]))
        log(f"{label:26s} {name:18s} share of dense {share:6.1%}  time vs default {vs:6.3f}")
      ref = runs[1][1](*args)
      for name, fn, _ in runs[2:]:
        log(f"{label} {name}: rel. difference to the default "
            + " / ".join(f"{rel(a, b):.1e}" for a, b in zip(jax.tree.leaves(fn(*args)), jax.tree.leaves(ref))))


def paired_shares(log, results, rounds=12, reps=10):
  """Issue 3's ratios through `flash_attention` (the backend `--backend` picks), each in paired rounds
  (`_paired_rounds`): the forward+backward of a teacher-forcing case against dense attention of the same
  length (tile rates, as `mosaic_mask_tune`), and the forward (and dense forward+backward) against cuDNN,
  dense and in the streaming decode shapes."""
  for case in ("tf:5:1", "tf:6:3"):
    mask = _case_mask(case)
    lq, lk = mask.shape
    frac = tile_schedule(mask, -(-lq // 128) * 128, -(-lk // 128) * 128, 128, 128).computed_fraction()
    flops = 3.5 * 4.0 * B * H * lq * lk * D
    runs = [("dense", attn_fns("pallas", None)[1], flops), ("masked", attn_fns("pallas", mask)[1], flops * frac)]
    times = _paired_rounds(log, f"fb {case} L={lq}", runs, tuple(inputs(lq, lk)[:3]), rounds, reps)
    share = float(np.median(np.asarray(times["dense"]) / np.asarray(times["masked"]) * frac))
    results.append(dict(label=f"paired fb {case}", mode="fb", share_of_dense=share))
    log(f"{'fb ' + case:26s} masked tile rate / dense tile rate, median of rounds: {share:6.1%}")
  for lq, lk, modes in ((4096, 4096, ("fwd", "fb")), (16384, 16384, ("fwd", "fb")), (1560, 16380, ("fwd",)),
                        (1560, 32760, ("fwd",)), (4680, 16380, ("fwd",))):
    args = tuple(inputs(lq, lk)[:3])
    for mode in modes:
      i, mult = (0, 1.0) if mode == "fwd" else (1, 3.5)
      flops = mult * 4.0 * B * H * lq * lk * D
      runs = [("pallas", attn_fns("pallas", None)[i], flops), ("cudnn", attn_fns("cudnn", None)[i], flops)]
      times = _paired_rounds(log, f"{mode} {lq}x{lk}", runs, args, rounds, reps)
      ratio = float(np.median(np.asarray(times["cudnn"]) / np.asarray(times["pallas"])))
      results.append(dict(label=f"paired {mode} {lq}x{lk}", mode=mode, rate_vs_cudnn=ratio))
      log(f"{mode + ' ' + str(lq) + 'x' + str(lk):26s} rate / cuDNN's, median of rounds: {ratio:.3f}x")


def mosaic_order_ab(log, results, cases=("tf:5:1", "tf:6:3", "tf:21:3", "dense:16384")):
  """The Mosaic kernels (fwd, fwd+bwd, fwd+JVP) with tiles handed out in index order and heaviest first
  (`mosaic.HEAVIEST_FIRST`), one after the other in the same process."""
  from pallas_kernels import mosaic  # noqa: PLC0415
  for case in cases:
    mask = _case_mask(case)
    L = mask.shape[0]
    q, k, v, tq, tk, tv = inputs(L, L)
    base = 4.0 * B * H * L * L * D * mask.density()
    for heaviest in (False, True):
      mosaic.HEAVIEST_FIRST = heaviest  # read at trace time: fresh jitted closures below
      fwd, fb, jv = attn_fns("pallas", mask)
      for mode, fn, args, mult in (("fwd", fwd, (q, k, v), 1.0), ("fb", fb, (q, k, v), 3.5),
                                   ("jvp", jv, (q, k, v, tq, tk, tv), 3.0)):
        t = timeit(fn, *args)
        results.append(dict(label=f"order {case}", heaviest_first=heaviest, mode=mode, ms=t * 1e3,
                            tflops=base * mult / t / 1e12))
        log(f"order {case:12s} heaviest_first={heaviest!s:5s} {mode:4s} {t*1e3:9.3f} ms "
            f"{base * mult / t / 1e12:7.1f} TFLOP/s")
  mosaic.HEAVIEST_FIRST = True


def matmul_peak(log):
  a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  t = timeit(f, a, a.T, reps=20)
  log(f"bf16 8192^3 matmul (XLA): {2 * 8192**3 / t / 1e12:.0f} TFLOP/s")


def tune(log, results, L=16384):
  """Sweep tile sizes / warps / stages per kernel at dense L (others at defaults)."""
  d = pk.BlockSizes()
  fwd_cfgs = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
              (128, 64, 4, 4), (128, 32, 4, 3)]
  jvp_cfgs = [(128, 64, 8, 2), (128, 64, 4, 2), (128, 64, 8, 3), (64, 64, 4, 2), (64, 64, 4, 3),
              (128, 32, 8, 2), (64, 32, 4, 3)]
  bwd_cfgs = [((64, 64, 4, 2), (64, 64, 4, 2)), ((64, 128, 8, 2), (64, 128, 8, 2)),
              ((128, 64, 8, 2), (64, 128, 8, 2)), ((64, 64, 4, 3), (64, 64, 4, 3)),
              ((128, 64, 8, 2), (128, 64, 8, 2)), ((64, 32, 4, 2), (32, 64, 4, 2))]
  K = pk.KernelConfig
  for c in fwd_cfgs:
    bench_case(f"tune fwd {c}", None, L, L, log, results, peers=False, xla_jvp=False,
               block_sizes=pk.BlockSizes(K(*c), d.bwd_dq, d.bwd_dkdv, d.jvp), modes=("fwd",))
  for c in jvp_cfgs:
    bench_case(f"tune jvp {c}", None, L, L, log, results, peers=False, xla_jvp=False,
               block_sizes=pk.BlockSizes(d.fwd, d.bwd_dq, d.bwd_dkdv, K(*c)), modes=("jvp",))
  for cq, ckv in bwd_cfgs:
    bench_case(f"tune bwd dq{cq} dkdv{ckv}", None, L, L, log, results, peers=False, xla_jvp=False,
               block_sizes=pk.BlockSizes(d.fwd, K(*cq), K(*ckv), d.jvp), modes=("fb",))


def tune2(log, results, L=16384):
  """Second sweep around the first one's winners (see RESULTS.md)."""
  d = pk.BlockSizes()
  K = pk.KernelConfig
  for c in [(128, 128, 8, 4), (128, 128, 4, 3), (64, 128, 4, 3), (128, 256, 8, 2), (64, 128, 8, 3)]:
    bench_case(f"tune fwd {c}", None, L, L, log, results, peers=False, xla_jvp=False,
               block_sizes=pk.BlockSizes(K(*c), d.bwd_dq, d.bwd_dkdv, d.jvp), modes=("fwd",))
  for c in [(128, 64, 8, 1), (64, 128, 4, 2), (128, 128, 8, 1)]:
    bench_case(f"tune jvp {c}", None, L, L, log, results, peers=False, xla_jvp=False,
               block_sizes=pk.BlockSizes(d.fwd, d.bwd_dq, d.bwd_dkdv, K(*c)), modes=("jvp",))
  for cq, ckv in [((128, 64, 8, 2), (64, 64, 4, 2)), ((64, 64, 4, 2), (128, 64, 8, 2)),
                  ((64, 64, 4, 2), (64, 128, 4, 2)), ((128, 32, 4, 2), (64, 64, 4, 2))]:
    bench_case(f"tune bwd dq{cq} dkdv{ckv}", None, L, L, log, results, peers=False, xla_jvp=False,
               block_sizes=pk.BlockSizes(d.fwd, K(*cq), K(*ckv), d.jvp), modes=("fb",))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--check", action="store_true")
  ap.add_argument("--bench", action="store_true")
  ap.add_argument("--tune", action="store_true")
  ap.add_argument("--tune2", action="store_true")
  ap.add_argument("--sizes", default="4096,16384,65536")
  ap.add_argument("--backend", default=None, choices=["auto", "triton", "mosaic", "mosaic_fwd"],
                  help="kernels of the 'pallas' rows; with 'mosaic' the Mosaic fwd + Triton bwd pairing and the "
                       "Triton kernels are timed beside it")
  ap.add_argument("--modes", default="fwd,fb,jvp", help="bench modes: fwd, fb (fwd+bwd), jvp")
  ap.add_argument("--skip-decode", action="store_true", help="leave out the streaming-decode cases")
  ap.add_argument("--tf-cases", default=",".join(f"{f}:{c}" for f, c in TF_CASES),
                  help="teacher-forcing masks to time, as frames:chunk_frames pairs")
  ap.add_argument("--mosaic-tune", action="store_true", help="time the Mosaic forward's (block_k, stages) configs")
  ap.add_argument("--mosaic-jvp-tune", action="store_true", help="time the fused forward+JVP kernels alone")
  ap.add_argument("--mosaic-order", action="store_true",
                  help="time the Mosaic kernels with tiles in index order and heaviest first")
  ap.add_argument("--mosaic-bwd-tune", action="store_true",
                  help="time the backward kernels alone: Mosaic configs beside the Triton pair")
  ap.add_argument("--bwd-cases", default="dense:16384,tf:21:3,cross:65520:512",
                  help="--mosaic-bwd-tune cases: dense:L, tf:FRAMES:CHUNK, cross:LQ:LK")
  ap.add_argument("--mosaic-mask-tune", action="store_true",
                  help="the Mosaic kernels' masked share of dense, and their single-run tile masks and persistent "
                       "CTAs against the code before them, in paired rounds")
  ap.add_argument("--mask-cases", default="tf:5:1,tf:6:3,tf:21:1")
  ap.add_argument("--mask-rounds", type=int, default=12)
  ap.add_argument("--paired-shares", action="store_true",
                  help="masked fwd+bwd share of dense and the rates against cuDNN, in paired rounds")
  ap.add_argument("--mosaic-persistent-tune", action="store_true",
                  help="time the Mosaic forward with one CTA per work item and with persistent CTAs")
  ap.add_argument("--check-only", default="", help="comma-separated substrings of the --check case names to run")
  ap.add_argument("--check-no-jvp", action="store_true", help="--check: forward and gradients only")
  ap.add_argument("--skip-scm", action="store_true", help="leave out the sCM/checkpoint case of --check")
  ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
  args = ap.parse_args()
  global BACKEND
  BACKEND = args.backend
  os.makedirs(args.out, exist_ok=True)
  logf = open(os.path.join(args.out, "attention_log.txt"), "a")

  def log(msg):
    print(msg, flush=True)
    logf.write(msg + "\n")
    logf.flush()

  log(f"# {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC  jax {jax.__version__}  "
      f"device {jax.devices()[0].device_kind}  argv {' '.join(sys.argv[1:])}")
  results = []
  ok = True
  if args.check:
    ok = check(log, scm=not args.skip_scm, only=[c for c in args.check_only.split(",") if c],
               jvp=not args.check_no_jvp)
  if (args.bench or args.tune or args.tune2 or args.mosaic_tune or args.mosaic_bwd_tune or args.mosaic_jvp_tune
      or args.mosaic_order or args.mosaic_persistent_tune or args.mosaic_mask_tune or args.paired_shares):
    matmul_peak(log)
  if args.mosaic_tune:
    mosaic_tune(log, results)
  if args.mosaic_bwd_tune:
    mosaic_bwd_tune(log, results, cases=args.bwd_cases.split(","))
  if args.mosaic_persistent_tune:
    mosaic_persistent_tune(log, results)
  if args.paired_shares:
    paired_shares(log, results, rounds=args.mask_rounds)
  if args.mosaic_mask_tune:
    mosaic_mask_tune(log, results, cases=args.mask_cases.split(","), rounds=args.mask_rounds)
  if args.mosaic_jvp_tune:
    mosaic_jvp_tune(log, results)
  if args.mosaic_order:
    mosaic_order_ab(log, results)
  if args.tune:
    tune(log, results)
  if args.bench:
    bench(log, results, [int(s) for s in args.sizes.split(",") if s], modes=tuple(args.modes.split(",")),
          decode=not args.skip_decode,
          tf_cases=tuple(tuple(int(x) for x in c.split(":")) for c in args.tf_cases.split(",") if c))
  if args.tune2:
    tune2(log, results)
  with open(os.path.join(args.out, "attention_results.json"), "w") as f:
    json.dump(results, f, indent=1)
  if not ok:
    sys.exit(1)


if __name__ == "__main__":
  main()
