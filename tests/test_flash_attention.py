"""flash_attention (Pallas, CPU interpret mode) against a float64 XLA reference: forward, grad, jvp, sCM."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings, strategies as st

import pallas_kernels as pk
from pallas_kernels import Mask, reference
from pallas_kernels.mask import KeyIntervals, runtime_schedule, tile_schedule
from rcm_jax.models import masks as video

SMALL = pk.BlockSizes(*(pk.KernelConfig(32, 16) for _ in range(4)))  # many tiles at small L
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.isfinite(a).all(), "non-finite output"
  # Floor of 0.05 RMS (inputs are unit normals, so real outputs and gradients are O(0.1-1)): a gradient
  # that is zero in exact arithmetic (dq at Lk = 1) is rounding noise in both.
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 0.05 * np.sqrt(b.size))


def _inputs(rng, b, lq, lk, h, hkv, d, dtype, n=1):
  """n sets of fresh (q, k, v) in `dtype`."""
  out = []
  for _ in range(n):
    out += [jnp.asarray(rng.standard_normal((b, lq, h, d)), dtype),
            jnp.asarray(rng.standard_normal((b, lk, hkv, d)), dtype),
            jnp.asarray(rng.standard_normal((b, lk, hkv, d)), dtype)]
  return out


def _ref64(mask, sm_scale=None):
  def f(q, k, v):
    return reference.attention(q, k, v, mask, sm_scale=sm_scale)
  def run(fn, *args):
    with jax.enable_x64(True):
      args = [jnp.asarray(np.asarray(a, np.float64)) for a in args]
      return jax.tree.map(np.asarray, fn(*args))
  return f, run


def _check_all(mask, shape, dtype, rng, block_sizes=SMALL, sm_scale=None):
  """Forward, grad (of a random linear functional) and jvp (all tangents) against float64."""
  b, lq, lk, h, hkv, d = shape
  q, k, v, tq, tk, tv = _inputs(rng, b, lq, lk, h, hkv, d, dtype, n=2)
  ct = jnp.asarray(rng.standard_normal((b, lq, h, d)), dtype)
  f = functools.partial(pk.flash_attention, mask=mask, sm_scale=sm_scale, block_sizes=block_sizes)
  ref, run = _ref64(mask, sm_scale)
  tol = TOL[dtype]

  o = jax.jit(f)(q, k, v)
  assert o.dtype == dtype and o.shape == q.shape
  assert _rel(o, run(ref, q, k, v)) < tol

  loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32) * ct.astype(jnp.float32))
  grads = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)
  ref_grads = run(lambda q, k, v, ct: jax.grad(lambda *a: jnp.sum(ref(*a) * ct), (0, 1, 2))(q, k, v),
                  q, k, v, ct)
  for name, g, rg in zip("qkv", grads, ref_grads):
    assert g.dtype == dtype
    assert _rel(g, rg) < 2 * tol, f"d{name}"

  o2, to = jax.jit(lambda *a: jax.jvp(f, a[:3], a[3:]))(q, k, v, tq, tk, tv)
  ro, rto = run(lambda *a: jax.jvp(ref, a[:3], a[3:]), q, k, v, tq, tk, tv)
  assert _rel(o2, ro) < tol
  assert _rel(to, rto) < 2 * tol


# --------------------------------------------------------------------------------------------------
# Random shapes and masks (hypothesis): ragged lengths, GQA, D in {64, 128}.
# --------------------------------------------------------------------------------------------------

@st.composite
def _rect_mask(draw, lq, lk):
  n = draw(st.integers(0, 5))
  rects = []
  for _ in range(n):
    q0, q1 = sorted(draw(st.tuples(st.integers(0, lq), st.integers(0, lq))))
    k0, k1 = sorted(draw(st.tuples(st.integers(0, lk), st.integers(0, lk))))
    rects.append((q0, q1, k0, k1))
  return Mask.from_ranges(lq, lk, rects)


@settings(max_examples=5, deadline=None, phases=(Phase.explicit, Phase.generate))  # shrinking recompiles
@given(data=st.data(), lq=st.integers(1, 90), lk=st.integers(1, 90), heads=st.sampled_from([(2, 1), (2, 2), (4, 2)]),
       d=st.sampled_from([64, 128]), kind=st.sampled_from(["none", "dense", "rects"]), seed=st.integers(0, 2**31))
def test_random_shapes_and_masks_f32(data, lq, lk, heads, d, kind, seed):
  rng = np.random.default_rng(seed)
  if kind == "none":
    mask = None
  elif kind == "dense":
    mask = Mask.from_dense(rng.random((lq, lk)) < data.draw(st.sampled_from([0.05, 0.5, 0.9])))
  else:
    mask = data.draw(_rect_mask(lq, lk))
  _check_all(mask, (1, lq, lk, *heads, d), jnp.float32, rng)


# --------------------------------------------------------------------------------------------------
# Video masks (rcm_jax.models.masks): teacher forcing and block-causal, windows and sinks.
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("builder,pattern", [
    (video.teacher_forcing, dict(num_frames=5, first_chunk_frames=1, chunk_frames=1)),
    (video.teacher_forcing, dict(num_frames=7, first_chunk_frames=1, chunk_frames=3, local_blocks=2, sink_blocks=1)),
    (video.block_causal, dict(num_frames=6, first_chunk_frames=2, chunk_frames=2)),
    (video.block_causal, dict(num_frames=7, first_chunk_frames=1, chunk_frames=1, local_blocks=3, sink_blocks=1)),
])
def test_video_masks(builder, pattern):
  rng = np.random.default_rng()
  mask = builder(tokens_per_frame=11, **pattern)  # 11: frames straddle tiles, so tiles are mixed
  lq = mask.shape[0]
  _check_all(mask, (1, lq, lq, 2, 2, 64), jnp.float32, rng)


def test_bf16_teacher_forcing_default_tiles():
  """bf16 with the production tile sizes (128 x 64): padding of a ragged length, bf16 tolerance."""
  rng = np.random.default_rng()
  mask = video.teacher_forcing(3, 50, first_chunk_frames=1, chunk_frames=1)
  _check_all(mask, (1, 300, 300, 2, 1, 128), jnp.bfloat16, rng, block_sizes=None)


def test_bf16_dense_gqa_scale():
  rng = np.random.default_rng()
  _check_all(None, (2, 40, 72, 4, 1, 64), jnp.bfloat16, rng, sm_scale=0.3)


def test_fully_masked_rows_give_zeros_and_finite_derivatives():
  rng = np.random.default_rng()
  lq, lk = 50, 40
  dense = rng.random((lq, lk)) < 0.5
  dense[3] = dense[17:40] = False  # 17..39 spans whole tiles and partial tiles
  mask = Mask.from_dense(dense)
  assert tile_schedule(mask, 64, 48, 32, 16).mode == "dense"  # also covers the dense element-mask path
  q, k, v, tq, tk, tv = _inputs(rng, 1, lq, lk, 2, 2, 64, jnp.float32, n=2)
  f = functools.partial(pk.flash_attention, mask=mask, block_sizes=SMALL)
  o, to = jax.jvp(f, (q, k, v), (tq, tk, tv))
  grads = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), (0, 1, 2))(q, k, v)
  for x in (o, to, *grads):
    assert np.isfinite(np.asarray(x)).all()
  assert np.all(np.asarray(o)[:, [3, *range(17, 40)]] == 0)
  assert np.all(np.asarray(to)[:, [3, *range(17, 40)]] == 0)
  assert np.all(np.asarray(grads[0])[:, [3, *range(17, 40)]] == 0)


def test_empty_mask():
  rng = np.random.default_rng()
  q, k, v = _inputs(rng, 1, 20, 20, 1, 1, 64, jnp.float32)
  mask = Mask.from_ranges(20, 20, [])
  o = pk.flash_attention(q, k, v, mask)
  g = jax.grad(lambda q: pk.flash_attention(q, k, v, mask).sum())(q)
  assert np.all(np.asarray(o) == 0) and np.all(np.asarray(g) == 0)


# --------------------------------------------------------------------------------------------------
# Transform compositions: sCM pattern, checkpoint, partial tangents, xla fallback.
# --------------------------------------------------------------------------------------------------

def _scm_grad(attn, w, x, tx, t):
  """grad_w of an sCM-style loss: target holds a jvp of the same net at stop-gradient'ed w and x."""
  def net(w, x):
    q, k, v = (jnp.einsum("bld,de->ble", x, w[i]).reshape(x.shape[0], x.shape[1], 2, 64) for i in range(3))
    return attn(q, k, v).reshape(x.shape[0], x.shape[1], -1) @ w[3]

  def loss(w):
    sw, sx = jax.lax.stop_gradient(w), jax.lax.stop_gradient(x)
    v_sg, dv = jax.jvp(lambda x: net(sw, x), (sx,), (tx,))  # dv at stop-gradient'ed params and inputs
    g = -(v_sg - x) - t * dv
    v = net(w, x)
    return jnp.sum((v - jax.lax.stop_gradient(v) - jax.lax.stop_gradient(g)) ** 2)

  return jax.jit(jax.grad(loss))(w)


def test_scm_pattern_matches_xla():
  rng = np.random.default_rng()
  b, l, e = 1, 37, 128
  mask = video.teacher_forcing(3, 6, first_chunk_frames=1, chunk_frames=1)
  l = mask.shape[0]
  w = jnp.asarray(rng.standard_normal((4, e, e)) / np.sqrt(e), jnp.float32)
  x = jnp.asarray(rng.standard_normal((b, l, e)), jnp.float32)
  tx = jnp.asarray(rng.standard_normal((b, l, e)), jnp.float32)
  ours = _scm_grad(functools.partial(pk.flash_attention, mask=mask, block_sizes=SMALL), w, x, tx, 0.7)
  xla = _scm_grad(functools.partial(pk.flash_attention, mask=mask, implementation="xla"), w, x, tx, 0.7)
  assert _rel(ours, xla) < 1e-4


def test_checkpoint_and_partial_tangents():
  rng = np.random.default_rng()
  mask = video.block_causal(4, 9, first_chunk_frames=1, chunk_frames=1)
  q, k, v, tq, _, tv = _inputs(rng, 1, 36, 36, 2, 1, 64, jnp.float32, n=2)
  f = functools.partial(pk.flash_attention, mask=mask, block_sizes=SMALL)
  ref, run = _ref64(mask)
  prev = jax.config.jax_remat3
  jax.config.update("jax_remat3", True)  # checkpointing a hijax primitive needs remat3 (attention.py doc)
  try:
    g = jax.jit(jax.grad(lambda q, k: jnp.sum(jnp.sin(jax.checkpoint(f)(q, k, v))), (0, 1)))(q, k)
  finally:
    jax.config.update("jax_remat3", prev)
  rg = run(lambda q, k, v: jax.grad(lambda q, k: jnp.sum(jnp.sin(ref(q, k, v))), (0, 1))(q, k), q, k, v)
  assert _rel(g[0], rg[0]) < 5e-5 and _rel(g[1], rg[1]) < 5e-5
  # jvp with a symbolic-zero tangent for k (only dq and dv paths in the fused kernel)
  _, to = jax.jvp(lambda q, v: f(q, k, v), (q, v), (tq, tv))
  _, rto = run(lambda q, k, v, tq, tv: jax.jvp(lambda q, v: ref(q, k, v), (q, v), (tq, tv)), q, k, v, tq, tv)
  assert _rel(to, rto) < 5e-5


def _kernel_calls(closed_jaxpr) -> dict:
  """Pallas kernels named in a jaxpr, sub-jaxprs included: {kernel name: count}."""
  counts = {}
  def walk(jaxpr):
    for e in jaxpr.eqns:
      if e.primitive.name == "pallas_call":
        counts[e.params["name"]] = counts.get(e.params["name"], 0) + 1
        continue
      for p in e.params.values():
        sub = getattr(p, "jaxpr", p)
        if hasattr(sub, "eqns"):
          walk(sub)
  walk(closed_jaxpr.jaxpr)
  return counts


@pytest.mark.parametrize("saved", [(), pk.RESIDUAL_NAMES, ("query", "key", "value", *pk.RESIDUAL_NAMES)])
def test_checkpoint_policy_saving_the_residuals_skips_the_forward_recompute(saved):
  """A remat policy that saves the kernel's output and logsumexp: the backward pass runs no forward kernel
  (full remat runs one), and the gradients are the un-rematted ones."""
  rng = np.random.default_rng()
  mask = video.teacher_forcing(3, 7, first_chunk_frames=1, chunk_frames=1)
  l, e = mask.shape[0], 128
  w = jnp.asarray(rng.standard_normal((4, e, e)) / np.sqrt(e), jnp.float32)
  x = jnp.asarray(rng.standard_normal((1, l, e)), jnp.float32)

  def block(w, x):
    q, k, v = (jax.ad_checkpoint.checkpoint_name((x @ w[i]).reshape(1, l, 2, 64), n)
               for i, n in enumerate(("query", "key", "value")))
    return jnp.tanh(pk.flash_attention(q, k, v, mask, block_sizes=SMALL).reshape(1, l, e) @ w[3])

  prev = jax.config.jax_remat3
  jax.config.update("jax_remat3", True)
  try:
    rematted = jax.checkpoint(block, policy=jax.checkpoint_policies.save_only_these_names(*saved))
    loss = lambda w: jnp.sum(rematted(w, x) ** 2)
    _, backward = jax.vjp(loss, w)
    calls = _kernel_calls(jax.make_jaxpr(backward)(jnp.float32(1)))
    g = jax.jit(jax.grad(loss))(w)
  finally:
    jax.config.update("jax_remat3", prev)
  saves = set(pk.RESIDUAL_NAMES) <= set(saved)
  assert calls.get("flash_fwd", 0) == (0 if saves else 1), calls
  assert calls["flash_bwd_dq"] == calls["flash_bwd_dkdv"] == 1, calls
  want = jax.jit(jax.grad(lambda w: jnp.sum(block(w, x) ** 2)))(w)
  assert _rel(g, want) < 1e-5
  if saves:   # per-example gradients under the same policy (vmap outside grad and remat)
    jax.config.update("jax_remat3", True)
    try:
      xs = jnp.stack([x, -2 * x])
      per = jax.jit(jax.vmap(lambda xi: jax.grad(lambda w: jnp.sum(rematted(w, xi) ** 2))(w)))(xs)
    finally:
      jax.config.update("jax_remat3", prev)
    assert _rel(per[1], jax.grad(lambda w: jnp.sum(block(w, -2 * x) ** 2))(w)) < 1e-5


def test_vmap_folds_into_batch():
  rng = np.random.default_rng()
  mask = video.block_causal(3, 7, first_chunk_frames=1, chunk_frames=1)
  q, k, v = (jnp.asarray(rng.standard_normal((3, 2, 21, 2, 64)), jnp.float32) for _ in range(3))
  f = functools.partial(pk.flash_attention, mask=mask, block_sizes=SMALL)
  want = np.stack([f(q[i], k[i], v[i]) for i in range(3)])
  np.testing.assert_allclose(jax.vmap(f)(q, k, v), want, atol=1e-5)
  np.testing.assert_allclose(jax.vmap(f, (0, None, None))(q, k[0], v[0]),
                             np.stack([f(q[i], k[0], v[0]) for i in range(3)]), atol=1e-5)
  g = jax.vmap(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2)))(q, k, v)
  np.testing.assert_allclose(g[1], jax.grad(lambda q: jnp.sum(f(q, k[1], v[1]) ** 2))(q[1]), atol=1e-5)


@pytest.mark.parametrize("d", [24, 32])
def test_small_head_dims_are_zero_padded(d):
  # toy models use head_dim 24-48; the kernels pad D to 64 and slice back, scale stays D ** -0.5
  rng = np.random.default_rng()
  mask = Mask.from_ranges(20, 20, [(0, 20, 0, 7), (7, 20, 7, 20)])
  _check_all(mask, (1, 20, 20, 2, 1, d), jnp.float32, rng)


def test_xla_fallback_equals_reference():
  rng = np.random.default_rng()
  q, k, v = _inputs(rng, 1, 10, 12, 2, 1, 32, jnp.float32)
  mask = Mask.from_ranges(10, 12, [(0, 10, 0, 5)])
  np.testing.assert_allclose(pk.flash_attention(q, k, v, mask, implementation="xla"),
                             reference.attention(q, k, v, mask), rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# Bad input: ValueError at trace time, naming the argument.
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,match", [
    (dict(q=(1, 8, 2, 48)), "head dim"),
    (dict(k=(1, 8, 3, 64), v=(1, 8, 3, 64)), "multiple of k/v heads"),
    (dict(v=(1, 9, 1, 64)), "k and v"),
    (dict(k=(2, 8, 1, 64), v=(2, 8, 1, 64)), "batch"),
    (dict(q=(8, 2, 64)), "q must be"),
    (dict(mask=Mask.full(8, 9)), "mask shape"),
    (dict(mask=np.ones((8, 8), bool)), "mask must be"),
    (dict(dtype_k=jnp.bfloat16), "share one dtype"),
    (dict(dtype=jnp.int32), "dtype"),
    (dict(implementation="cudnn"), "implementation"),
    (dict(q=(1, 8, 2, 256), k=(1, 8, 1, 256), v=(1, 8, 1, 256)), r"supported: D <= 128"),
])
def test_bad_input(change, match):
  shapes = dict(q=(1, 8, 2, 64), k=(1, 8, 1, 64), v=(1, 8, 1, 64))
  shapes.update({n: s for n, s in change.items() if n in "qkv"})
  dtype = change.get("dtype", jnp.float32)
  q, k, v = (jax.ShapeDtypeStruct(shapes[n], change.get(f"dtype_{n}", dtype)) for n in "qkv")
  kwargs = {n: change[n] for n in ("mask", "implementation") if n in change}
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda q, k, v: pk.flash_attention(q, k, v, **kwargs), q, k, v)


# --------------------------------------------------------------------------------------------------
# Forward backend dispatch and the Mosaic GPU (Hopper) forward kernel. The kernel cannot run on the CPU;
# here it is lowered for CUDA (jax's Mosaic GPU lowering is Python and runs without a GPU) and run in
# jax's Mosaic GPU interpreter (barriers, TMA copies and wgmma emulated on the CPU). Compiled-kernel
# numbers and checks on the H100: benchmarks/RESULTS.md ("Mosaic GPU forward").
# --------------------------------------------------------------------------------------------------

from pallas_kernels import mosaic  # noqa: E402
from pallas_kernels.attention import BACKEND_ENV, resolve_backend  # noqa: E402
from rcm_jax.errors import UserError  # noqa: E402


def test_backend_dispatch_picks_triton_on_cpu(monkeypatch):
  mask = Mask.full(300, 300)
  monkeypatch.delenv(BACKEND_ENV, raising=False)
  for interpret in (True, False):  # CPU: interpret mode, or compiled on a non-Hopper device
    assert resolve_backend(None, jnp.bfloat16, 128, mask, 300, 300, interpret) == "triton"
    assert resolve_backend("auto", jnp.bfloat16, 128, mask, 300, 300, interpret) == "triton"
  for forced in ("mosaic", "mosaic_fwd"):
    with pytest.raises(UserError, match=f"backend='{forced}' cannot run this call: interpret mode"):
      resolve_backend(forced, jnp.bfloat16, 128, mask, 300, 300, True)
  with pytest.raises(UserError, match=BACKEND_ENV):
    monkeypatch.setenv(BACKEND_ENV, "cutlass")
    resolve_backend(None, jnp.bfloat16, 128, mask, 300, 300, True)
  monkeypatch.setenv(BACKEND_ENV, "mosaic")
  q = jax.ShapeDtypeStruct((1, 300, 2, 64), jnp.bfloat16)
  with pytest.raises(UserError, match=f"{BACKEND_ENV}='mosaic'"):
    jax.eval_shape(lambda q: pk.flash_attention(q, q, q), q)
  # the op on the CPU with the default backend runs the portable kernels and stays correct
  monkeypatch.setenv(BACKEND_ENV, "auto")
  rng = np.random.default_rng()
  q, k, v = _inputs(rng, 1, 40, 40, 2, 1, 64, jnp.bfloat16)
  ref, run = _ref64(None)
  assert _rel(pk.flash_attention(q, k, v), run(ref, q, k, v)) < TOL[jnp.bfloat16]


def test_mosaic_support_rules():
  rng = np.random.default_rng(0)
  tf = video.teacher_forcing(7, 100, first_chunk_frames=1, chunk_frames=3, local_blocks=2, sink_blocks=1)
  assert mosaic.unsupported_reason(jnp.bfloat16, 128, tf, 1400, 1400) is None
  assert mosaic.unsupported_reason(jnp.bfloat16, 64, Mask.full(10, 7), 10, 7) is None
  assert "dtype" in mosaic.unsupported_reason(jnp.float32, 128, tf, 1400, 1400)
  assert "head dim" in mosaic.unsupported_reason(jnp.bfloat16, 96, tf, 1400, 1400)
  noisy = Mask.from_dense(rng.random((200, 300)) < 0.5)  # many runs per row: dense element-mask mode
  assert "dense element mask" in mosaic.unsupported_reason(jnp.bfloat16, 128, noisy, 200, 300)
  many = Mask.from_ranges(128, 640, [(0, 128, 100 * i, 100 * i + 50) for i in range(6)])  # 6 intervals a row
  assert "intervals per row" in mosaic.unsupported_reason(jnp.bfloat16, 128, many, 128, 640)


def _lowering_case(d, heads):
  """A teacher-forcing mask and bf16 q / kv shapes (no data) for the CUDA lowering tests."""
  mask = video.teacher_forcing(5, 100, first_chunk_frames=1, chunk_frames=1)
  lq = mask.shape[0]
  return (mask, lq, jax.ShapeDtypeStruct((1, lq, heads[0], d), jnp.bfloat16),
          jax.ShapeDtypeStruct((1, lq, heads[1], d), jnp.bfloat16))


@pytest.mark.parametrize("d,heads,pingpong,fused,splits", [
    (128, (4, 2), False, False, None), (64, (2, 2), False, False, None), (128, (4, 2), True, False, None),
    (128, (4, 2), False, True, None), (64, (2, 2), False, True, None), (128, (4, 2), False, False, 3),
    (128, (4, 2), False, True, 3)])
def test_mosaic_backward_lowers_for_hopper(d, heads, pingpong, fused, splits):
  """The backward kernels lower for CUDA; fused: one kernel (dk/dv with dQ TMA-added), not two; splits: fp32
  partial dk/dv through the staging tile."""
  mask, lq, q, kv = _lowering_case(d, heads)
  lse = jax.ShapeDtypeStruct((1, heads[0], lq), jnp.float32)
  cfg = mosaic.MosaicBwdConfig(pingpong=pingpong, fused_dq=fused, dkdv_splits=splits)
  fn = jax.jit(lambda q, k, v, o, lse, do: mosaic.backward(q, k, v, o, lse, do, mask, sm_scale=d ** -0.5, cfg=cfg))
  text = fn.trace(q, kv, kv, q, lse, q).lower(lowering_platforms=("cuda",)).as_text()
  kernels = text.count("stablehlo.custom_call @mosaic_gpu")
  assert kernels == (1 if fused else 2), kernels
  dq, dk, dv = jax.eval_shape(fn, q, kv, kv, q, lse, q)
  assert dq.shape == q.shape and dk.shape == dv.shape == kv.shape and dq.dtype == dk.dtype == jnp.bfloat16


@pytest.mark.parametrize("present", [(True, True, True), (False, True, False)])
def test_mosaic_forward_jvp_lowers_for_hopper(present):
  mask, _, q, kv = _lowering_case(128, (4, 2))

  def fn(q, k, v, tq, tk, tv):
    tq, tk, tv = (t if keep else None for t, keep in zip((tq, tk, tv), present))
    return mosaic.forward_jvp(q, k, v, tq, tk, tv, mask, sm_scale=128 ** -0.5)

  assert "mosaic_gpu" in jax.jit(fn).trace(q, kv, kv, q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
  o, to = jax.eval_shape(fn, q, kv, kv, q, kv, kv)
  assert o.shape == to.shape == q.shape and o.dtype == to.dtype == jnp.bfloat16


@pytest.mark.parametrize("d,heads,ctas,splits", [(128, (4, 2), 0, 1), (64, (2, 2), 0, 1), (128, (4, 2), 132, 1),
                                                 (128, (4, 2), 0, 3)])
def test_mosaic_forward_lowers_for_hopper(d, heads, ctas, splits):
  mask, lq, q, kv = _lowering_case(d, heads)
  cfg = mosaic.MosaicConfig(persistent_ctas=ctas, kv_splits=splits)
  fn = jax.jit(lambda q, k, v: mosaic.forward(q, k, v, mask, sm_scale=d ** -0.5, cfg=cfg))
  text = fn.trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
  out = jax.eval_shape(fn, q, kv, kv)
  assert out[0].shape == q.shape and out[0].dtype == jnp.bfloat16
  assert out[1].shape == (1, heads[0], lq) and out[1].dtype == jnp.float32


def test_mosaic_forward_on_a_kv_stack_lowers_for_hopper():
  mask = Mask.from_ranges(4680, 9472, [(0, 4680, 0, 4680), (0, 4680, 4680, 9360)])
  q = jax.ShapeDtypeStruct((1, 4680, 12, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((30, 1, 9472, 12, 128), jnp.bfloat16)
  fn = jax.jit(lambda q, k, v, i: mosaic.forward(q, k, v, mask, sm_scale=128 ** -0.5, kv_index=i)[0])
  text = fn.trace(q, kv, kv, jax.ShapeDtypeStruct((), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
  # the stacks reach the kernel through a (free) reshape: no slice or pad of them
  assert "mosaic_gpu" in text and "stablehlo.reshape %arg1" in text and "stablehlo.dynamic_slice" not in text
  assert "stablehlo.pad %arg1" not in text and "stablehlo.pad %arg2" not in text


def test_mosaic_forward_lowering_rejects_too_much_shared_memory():
  q = jax.ShapeDtypeStruct((1, 256, 1, 128), jnp.bfloat16)
  fn = jax.jit(lambda q, k, v: mosaic.forward(q, k, v, Mask.full(256, 256), sm_scale=0.1,
                                              cfg=mosaic.MosaicConfig(block_k=128, stages=3)))
  with pytest.raises(Exception, match="shared memory"):
    fn.trace(q, q, q).lower(lowering_platforms=("cuda",))


def test_mosaic_forward_in_gpu_interpreter():
  """The kernel's schedule walk, barriers, element masks and empty rows, in jax's Mosaic GPU interpreter."""
  plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
  if not hasattr(plgpu, "InterpretGPUParams"):
    pytest.skip("this jax has no Mosaic GPU interpreter")
  rng = np.random.default_rng()
  # rows 0-19 allow nothing; rows 20-119 two intervals; 3 key tiles of 128 > 2 ring slots (slot reuse)
  mask = Mask.from_ranges(200, 300, [(20, 200, 0, 70), (20, 120, 100, 190), (120, 200, 150, 300)])
  q, k, v = _inputs(rng, 1, 200, 300, 2, 1, 64, jnp.bfloat16)
  o, lse = mosaic.forward(q, k, v, mask, sm_scale=0.125, interpret=plgpu.InterpretGPUParams())
  ref, run = _ref64(mask, sm_scale=0.125)
  assert _rel(o, run(ref, q, k, v)) < TOL[jnp.bfloat16]
  assert np.all(np.asarray(o)[:, :20] == 0)
  s = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, 2))
  s = np.where(mask.to_dense(), s * 0.125 / np.log(2), -np.inf)[:, :, 20:]  # base-2 logits, rows 20+
  ref_lse = np.log2(np.exp2(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
  np.testing.assert_allclose(np.asarray(lse)[:, :, 20:], ref_lse, rtol=1e-5, atol=1e-4)
  assert np.all(np.asarray(lse)[:, :, :20] >= 1e29)  # lse2 = BIG on fully masked rows (backward reads it)


def test_mosaic_persistent_forward_in_gpu_interpreter():
  """persistent_ctas: 3 CTAs take the 16 work items (2 batch x 2 heads x 4 query tiles) in a snake, 5/5/6 each,
  one tile's rows allowing nothing (an item with no key tile); the ring's slots carry on across items. The same
  o and lse as one CTA per item, bit for bit, and the float64 reference's o."""
  plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
  if not hasattr(plgpu, "InterpretGPUParams"):
    pytest.skip("this jax has no Mosaic GPU interpreter")
  rng = np.random.default_rng()
  lq, lk = int(rng.integers(390, 420)), int(rng.integers(280, 380))
  e = int(rng.integers(130, 150))   # rows [0, e): nothing allowed, so query tile 0 computes no key tile
  mask = Mask.from_ranges(lq, lk, [(e, lq, 0, int(rng.integers(40, 120))), (e, lq // 2, 130, 260),
                                   (lq // 2, lq, 200, lk)])
  q, k, v = _inputs(rng, 2, lq, lk, 2, 1, 64, jnp.bfloat16)
  interp = plgpu.InterpretGPUParams()
  o, lse = mosaic.forward(q, k, v, mask, sm_scale=0.125, interpret=interp,
                          cfg=mosaic.MosaicConfig(persistent_ctas=3))
  o1, lse1 = mosaic.forward(q, k, v, mask, sm_scale=0.125, interpret=interp)
  np.testing.assert_array_equal(np.asarray(o), np.asarray(o1))
  np.testing.assert_array_equal(np.asarray(lse), np.asarray(lse1))
  ref, run = _ref64(mask, sm_scale=0.125)
  assert _rel(o, run(ref, q, k, v)) < TOL[jnp.bfloat16]
  assert np.all(np.asarray(o)[:, :e] == 0)


def test_mosaic_split_kv_forward_in_gpu_interpreter():
  """kv_splits=3: three CTAs share each query tile's key tiles (parts cut inside the partial tiles and inside the
  full ones, a part with no tile, rows that a part sees nothing of, rows nothing allows); their partial o and
  lse2 combined after the kernel meet one CTA per tile and the float64 reference (o and lse2)."""
  plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
  if not hasattr(plgpu, "InterpretGPUParams"):
    pytest.skip("this jax has no Mosaic GPU interpreter")
  rng = np.random.default_rng()
  lq, lk = int(rng.integers(250, 300)), int(rng.integers(520, 640))
  e = int(rng.integers(130, 150))   # rows [0, e): nothing allowed
  mask = Mask.from_ranges(lq, lk, [(e, lq, 0, int(rng.integers(40, 120))), (e, lq, 300, lk),
                                   (max(e, lq // 2), lq, 150, 250)])
  q, k, v = _inputs(rng, 2, lq, lk, 2, 1, 64, jnp.bfloat16)
  interp = plgpu.InterpretGPUParams()
  cfg = lambda s: mosaic.MosaicConfig(persistent_ctas=0, kv_splits=s)
  o, lse = mosaic.forward(q, k, v, mask, sm_scale=0.125, interpret=interp, cfg=cfg(3))
  o1, lse1 = mosaic.forward(q, k, v, mask, sm_scale=0.125, interpret=interp, cfg=cfg(1))
  ref, run = _ref64(mask, sm_scale=0.125)
  assert _rel(o, run(ref, q, k, v)) < TOL[jnp.bfloat16] and _rel(o, o1) < 1e-2
  np.testing.assert_allclose(np.asarray(lse)[:, :, e:], np.asarray(lse1)[:, :, e:], rtol=1e-5, atol=1e-4)
  assert np.all(np.asarray(o)[:, :e] == 0) and np.all(np.asarray(lse)[:, :, :e] >= 1e29)
  with pytest.raises(ValueError, match="persistent_ctas"):
    mosaic.forward(q, k, v, mask, sm_scale=0.125, interpret=interp,
                   cfg=mosaic.MosaicConfig(persistent_ctas=4, kv_splits=2))


def test_mosaic_combine_parts_against_float64():
  """Split-KV's combine: o = sum_i 2^(lse_i - lse) o_i, lse = log2 sum_i 2^lse_i over the parts that saw a key
  of the row (lse_i = BIG marks the others); a row no part saw gives o = 0, lse = BIG. The kernel's o may have
  fewer rows than its lse (unpadded o on the GPU)."""
  from pallas_kernels.kernels import BIG  # noqa: PLC0415
  rng = np.random.default_rng()
  s, b, lq, h, d = 3, 2, int(rng.integers(5, 12)), 2, 8
  o = rng.standard_normal((s * b, lq, h, d))
  lse = rng.standard_normal((s * b, h, 16)) * 4
  lse[rng.random(lse.shape) < 0.3] = BIG
  lse[:, 0, 1] = BIG                                   # row 1 of head 0: no part saw a key
  got_o, got_lse = mosaic._combine_parts(jnp.asarray(o, jnp.float32), jnp.asarray(lse, jnp.float32), s)
  o5, l5 = o.reshape(s, b, lq, h, d), lse.reshape(s, b, h, 16)[..., :lq]
  w = np.where(l5 < BIG / 2, np.exp2(np.minimum(l5, 1e3)), 0.0)   # [s, b, h, lq]
  tot = w.sum(0)
  want_lse = np.where(tot > 0, np.log2(np.maximum(tot, 1e-300)), BIG)
  want_o = (np.swapaxes(w / np.maximum(tot, 1e-300), 2, 3)[..., None] * o5).sum(0)
  np.testing.assert_allclose(np.asarray(got_o), want_o, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got_lse), want_lse, rtol=1e-6, atol=1e-5)
  assert np.all(np.asarray(got_o)[:, 1, 0] == 0) and np.all(np.asarray(got_lse)[:, 0, 1] >= 1e29)


def test_mosaic_kv_splits_rule():
  """kv_splits=None: split-KV only where one CTA per item leaves fewer than two waves on the SMs and a fuller last
  wave is to be had, with >= 16 key tiles a part: one 1,560-token chunk against a 16,380-key cache (156 items)
  takes 5 parts; long sequences, persistent launches and run-time masks take none."""
  cfg, pad = mosaic.MosaicConfig(), lambda n: -(-n // 128) * 128
  sched = lambda mask: tile_schedule(mask, pad(mask.shape[0]), pad(mask.shape[1]), 128, 128)
  rule = lambda mask, items, persistent=0: mosaic._kv_splits(cfg, sched(mask), items, persistent)
  decode = Mask.full(1560, 16380)
  assert rule(decode, 12 * 13) == 5
  assert rule(Mask.full(1560, 1024), 12 * 13) == 1            # 8 key tiles: no part would keep 16
  assert rule(decode, 12 * 13, persistent=132) == 1
  assert rule(Mask.full(4680, 16380), 12 * 37) == 1           # 444 items: more than two waves
  assert rule(video.teacher_forcing(21, 1560, first_chunk_frames=1, chunk_frames=1), 12 * 512) == 1
  assert mosaic._kv_splits(cfg, None, 12 * 13, 0) == 1   # a run-time KeyIntervals mask: no static schedule
  assert mosaic._kv_splits(mosaic.MosaicConfig(kv_splits=3), sched(decode), 156, 0) == 3


def test_mosaic_persistent_ctas_rule():
  """persistent_ctas=None: one CTA per SM where a query tile computes fewer than PERSISTENT_BELOW key tiles on
  average (teacher forcing at 15,600 tokens: 38), one per work item where more (65,520 tokens: 136, dense), and
  for run-time masks; an explicit count stands."""
  cfg, pad = mosaic.MosaicConfig(), lambda n: -(-n // 128) * 128
  sched = lambda mask: tile_schedule(mask, pad(mask.shape[0]), pad(mask.shape[1]), 128, 128)
  rule = lambda mask: mosaic._persistent_ctas(cfg, sched(mask))
  short = video.teacher_forcing(5, 1560, first_chunk_frames=1, chunk_frames=1)
  assert rule(short) == mosaic.SMS
  assert rule(video.teacher_forcing(21, 1560, first_chunk_frames=1, chunk_frames=1)) == 0
  assert rule(Mask.full(15600, 15600)) == 0 and rule(Mask.full(4096, 4096)) == mosaic.SMS
  assert mosaic._persistent_ctas(cfg, None) == 0   # a run-time KeyIntervals mask has no static schedule
  for n in (0, 7):
    assert mosaic._persistent_ctas(mosaic.MosaicConfig(persistent_ctas=n), sched(short)) == n


def test_mosaic_forward_reads_one_entry_of_a_kv_stack_in_gpu_interpreter():
  """kv_index (the streaming KV cache of all layers): the kernel reads entry i of stacked k/v [N, B, Lk, Hkv, D]
  in place, batch entry b at stack row i * B + b; the same as slicing entry i first. Lk must be a tile multiple."""
  plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
  if not hasattr(plgpu, "InterpretGPUParams"):
    pytest.skip("this jax has no Mosaic GPU interpreter")
  rng = np.random.default_rng()
  n, b = 3, 2
  mask = Mask.from_ranges(100, 256, [(0, 100, 0, 90), (0, 100, 128, 228)])   # cache slots | chunk | padding
  q = jnp.asarray(rng.standard_normal((b, 100, 2, 64)), jnp.bfloat16)
  ks, vs = (jnp.asarray(rng.standard_normal((n, b, 256, 1, 64)), jnp.bfloat16) for _ in range(2))
  i = int(rng.integers(1, n))   # not 0: an ignored index would pass
  fn = jax.jit(lambda q, k, v, i: mosaic.forward(q, k, v, mask, sm_scale=0.125, interpret=plgpu.InterpretGPUParams(),
                                                 kv_index=i)[0])
  ref, run = _ref64(mask, sm_scale=0.125)
  assert _rel(fn(q, ks, vs, jnp.int32(i)), run(ref, q, ks[i], vs[i])) < TOL[jnp.bfloat16]
  with pytest.raises(ValueError, match="multiple of block_k"):
    mosaic.forward(q, ks[:, :, :200], vs[:, :, :200], Mask.full(100, 200), sm_scale=0.125, kv_index=0)


def test_flash_attention_stacked_reads_one_entry_and_rejects_bad_stacks():
  """The portable path (CPU: interpret mode) slices entry `index` (traced) and runs `flash_attention` on it."""
  rng = np.random.default_rng()
  mask = video.chunk_vs_cache([0, -1], 1, 1, 8, key_len=40)        # a cache slot, an empty one, the chunk, pad
  q = jnp.asarray(rng.standard_normal((2, 8, 2, 64)), jnp.float32)
  ks, vs = (jnp.asarray(rng.standard_normal((3, 2, 40, 1, 64)), jnp.float32) for _ in range(2))
  i = int(rng.integers(3))
  o = jax.jit(lambda q, k, v, i: pk.flash_attention_stacked(q, k, v, i, mask))(q, ks, vs, jnp.int32(i))
  ref, run = _ref64(mask)
  assert _rel(o, run(ref, q, ks[i], vs[i])) < TOL[jnp.float32]
  with pytest.raises(ValueError, match="stacks"):
    pk.flash_attention_stacked(q, ks[0], vs[0], 0, mask)
  with pytest.raises(ValueError, match="mask shape"):
    pk.flash_attention_stacked(q, ks[:, :, :32], vs[:, :, :32], 0, mask)


@pytest.mark.parametrize("pingpong,splits,fused,d", [(False, None, False, 64), (True, None, False, 64),
                                                      (False, 3, False, 64), (False, None, True, 64),
                                                      (False, 3, True, 64), (False, None, False, 128)])
def test_mosaic_backward_in_gpu_interpreter(pingpong, splits, fused, d):
  """dq and dk/dv kernels in jax's Mosaic GPU interpreter: grouped heads, ragged lengths, rows with no
  allowed key (a whole query tile of them), keys no row may see (a whole key tile), several intervals per
  row, more tiles than ring slots; against float64 gradients. pingpong: the two consumer warpgroups'
  alternating schedule (a barrier phase count that differs between them would hang or fail here). splits:
  three CTAs per key tile share its query tiles, parts that cut its list inside the partial tiles, at their
  end and inside the full ones, and parts with no tile (the key tile no row sees). fused: dQ formed in the
  dk/dv kernel (its per-warpgroup products, which the GPU TMA-adds, stored and summed here). d: the head
  dimension (128: Wan's, two swizzle tiles a row)."""
  plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
  if not hasattr(plgpu, "InterpretGPUParams"):
    pytest.skip("this jax has no Mosaic GPU interpreter")
  rng = np.random.default_rng()
  lq, lk = int(rng.integers(290, 360)), int(rng.integers(400, 450))
  e = int(rng.integers(130, min(150, lq // 2)))  # rows [0, e) allow nothing: query tile 0 has no key tile
  # keys [256, 384) (key tile 2) allowed to no row
  mask = Mask.from_ranges(lq, lk, [(e, lq, 0, int(rng.integers(40, 90))), (e, lq // 2, 100, 190),
                                   (lq // 2, lq, 150, 250), (lq // 2, lq, 390, lk)])
  q, k, v = _inputs(rng, 1, lq, lk, 4, 2, d, jnp.bfloat16)
  do = jnp.asarray(rng.standard_normal(q.shape), jnp.bfloat16)
  interp = plgpu.InterpretGPUParams()
  # a sharp softmax (scale 0.3 > 64 ** -0.5): o is close to one value row, so delta = rowsum(dO * o) is as
  # large as dP and an error in its term shows in the gradients
  o, lse = mosaic.forward(q, k, v, mask, sm_scale=0.3, interpret=interp)
  grads = mosaic.backward(q, k, v, o, lse, do, mask, sm_scale=0.3, interpret=interp,
                          cfg=mosaic.MosaicBwdConfig(pingpong=pingpong, dkdv_splits=splits, fused_dq=fused))
  ref, run = _ref64(mask, sm_scale=0.3)
  want = run(lambda q, k, v, do: jax.vjp(ref, q, k, v)[1](do), q, k, v, do)
  for name, got, w in zip(("dq", "dk", "dv"), grads, want):
    assert got.shape == w.shape and got.dtype == jnp.bfloat16, name
    assert _rel(got, w) < TOL[jnp.bfloat16], name
  assert np.all(np.asarray(grads[0])[:, :e] == 0)  # rows with nothing allowed get no gradient
  assert np.all(np.asarray(grads[1])[:, 256:384] == 0) and np.all(np.asarray(grads[2])[:, 256:384] == 0)
  if splits and not fused:   # fp32 partial dk/dv: no less accurate than one CTA per key tile
    whole = mosaic.backward(q, k, v, o, lse, do, mask, sm_scale=0.3, interpret=interp,
                            cfg=mosaic.MosaicBwdConfig(dkdv_splits=1))
    for got, one, w in zip(grads[1:], whole[1:], want[1:]):
      assert _rel(got, w) <= 1.05 * _rel(one, w)


def test_mosaic_kernels_mask_single_run_tiles_in_gpu_interpreter(monkeypatch):
  """A mask whose rows' intervals never share a key tile (`TileSchedule.single_run`, as in teacher forcing): the
  forward masks a partial tile by one range a row (`mosaic._mask_tile`; the backward and the JVP keep the
  interval pairs). All three against float64, with ranges that start and end inside tiles, two intervals a row,
  rows with nothing allowed, full tiles beside partial ones, ragged lengths; the forward equal bit for bit to the
  general interval masking."""
  plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
  if not hasattr(plgpu, "InterpretGPUParams"):
    pytest.skip("this jax has no Mosaic GPU interpreter")
  rng = np.random.default_rng()
  lq, lk = int(rng.integers(290, 360)), int(rng.integers(520, 560))
  e, a = int(rng.integers(130, 150)), int(rng.integers(40, 90))   # rows [0, e) allow nothing
  mask = Mask.from_ranges(lq, lk, [(e, lq // 2, 0, a), (e, lq // 2, int(rng.integers(260, 290)), 330),
                                   (lq // 2, lq, int(rng.integers(140, 170)), 250), (lq // 2, lq, 380, lk)])
  sched = tile_schedule(mask, 384, 640, 128, 128)
  assert sched.single_run and set(np.unique(sched.tile_state)) == {0, 1, 2}   # empty, partial and full tiles
  q, k, v, tq, tk, tv = _inputs(rng, 1, lq, lk, 4, 2, 64, jnp.bfloat16, n=2)
  do = jnp.asarray(rng.standard_normal(q.shape), jnp.bfloat16)
  interp = plgpu.InterpretGPUParams()
  ref, run = _ref64(mask, sm_scale=0.3)
  o, lse = mosaic.forward(q, k, v, mask, sm_scale=0.3, interpret=interp)
  assert _rel(o, run(ref, q, k, v)) < TOL[jnp.bfloat16]
  grads = mosaic.backward(q, k, v, o, lse, do, mask, sm_scale=0.3, interpret=interp)
  want = run(lambda q, k, v, do: jax.vjp(ref, q, k, v)[1](do), q, k, v, do)
  for name, got, w in zip(("dq", "dk", "dv"), grads, want):
    assert _rel(got, w) < TOL[jnp.bfloat16], name
  o_j, to = mosaic.forward_jvp(q, k, v, tq, tk, tv, mask, sm_scale=0.3, interpret=interp)
  want_o, want_t = run(lambda *x: jax.jvp(ref, x[:3], x[3:]), q, k, v, tq, tk, tv)
  assert _rel(o_j, want_o) < TOL[jnp.bfloat16] and _rel(to, want_t) < TOL[jnp.bfloat16]
  assert np.all(np.asarray(o)[:, :e] == 0) and np.all(np.asarray(to)[:, :e] == 0)
  monkeypatch.setattr(mosaic, "SINGLE_RUN", False)
  o_general, _ = mosaic.forward(q, k, v, mask, sm_scale=0.3, interpret=interp)
  np.testing.assert_array_equal(np.asarray(o), np.asarray(o_general))


def test_auto_dkdv_splits():
  """Split the dk/dv kernel's query walk only below 4 CTAs per SM, and never into parts of fewer than 8 tiles."""
  assert mosaic.auto_dkdv_splits(12 * 512, 1024) == 1                  # 65,520-token self-attention
  assert mosaic.auto_dkdv_splits(12 * 4, 1024) == 11                   # Wan text cross-attention: 48 CTAs
  assert mosaic.auto_dkdv_splits(16, 40) == 5 and mosaic.auto_dkdv_splits(16, 7) == 1
  assert mosaic.auto_dkdv_splits(4 * mosaic.SMS, 4096) == 1


@pytest.mark.parametrize("present", [(True, True, True), (False, True, False), (True, False, True)])
def test_mosaic_forward_jvp_in_gpu_interpreter(present):
  """The fused forward+JVP kernel in jax's Mosaic GPU interpreter, with some tangents symbolic zeros (None):
  grouped heads, ragged lengths, rows with no allowed key, several intervals per row, slot reuse."""
  plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
  if not hasattr(plgpu, "InterpretGPUParams"):
    pytest.skip("this jax has no Mosaic GPU interpreter")
  rng = np.random.default_rng()
  lq, lk = int(rng.integers(130, 260)), int(rng.integers(200, 330))
  e = int(rng.integers(5, 30))
  mask = Mask.from_ranges(lq, lk, [(e, lq, 0, 70), (e, lq // 2, 90, 180), (lq // 2, lq, 150, lk)])
  q, k, v, tq, tk, tv = _inputs(rng, 1, lq, lk, 4, 2, 64, jnp.bfloat16, n=2)
  tans = [t if keep else None for t, keep in zip((tq, tk, tv), present)]
  o, to = mosaic.forward_jvp(q, k, v, *tans, mask, sm_scale=0.125, interpret=plgpu.InterpretGPUParams())
  ref, run = _ref64(mask, sm_scale=0.125)
  zeros = [t if t is not None else jnp.zeros_like(x) for t, x in zip(tans, (q, k, v))]
  want_o, want_t = run(lambda *a: jax.jvp(ref, a[:3], a[3:]), q, k, v, *zeros)
  assert _rel(o, want_o) < TOL[jnp.bfloat16] and _rel(to, want_t) < TOL[jnp.bfloat16]
  assert np.all(np.asarray(o)[:, :e] == 0) and np.all(np.asarray(to)[:, :e] == 0)


def test_mosaic_backward_config_error():
  """Backward options that do not go together fail before any kernel is built, naming the fields."""
  mask, lq, q, kv = _lowering_case(128, (4, 2))
  lse = jax.ShapeDtypeStruct((1, 4, lq), jnp.float32)
  cfg = mosaic.MosaicBwdConfig(fused_dq=True, pingpong=True)
  fn = lambda q, k, v, o, lse, do: mosaic.backward(q, k, v, o, lse, do, mask, sm_scale=0.1, cfg=cfg)
  with pytest.raises(ValueError, match="fused_dq and pingpong"):
    jax.eval_shape(fn, q, kv, kv, q, lse, q)


@pytest.mark.parametrize("lq,lk", [(1260, 700), (1000, 1003)])
def test_mosaic_kernels_lower_for_hopper_at_ragged_lengths(lq, lk):
  """On the GPU the kernels take q/k/v/dO unpadded but for a multiple of 8 rows (TMA's row tiling; lengths
  that are not one failed to lower before `_pad_len` padded them to it): forward, backward and JVP lower
  at lengths that are multiples of neither 8 nor the tiles (the forward's o also unpadded), and the results
  keep the callers' shapes."""
  mask = Mask.from_ranges(lq, lk, [(0, lq, 0, lk // 2), (lq // 3, lq, lk // 2, lk)])
  q = jax.ShapeDtypeStruct((1, lq, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, lk, 2, 128), jnp.bfloat16)
  lse = jax.ShapeDtypeStruct((1, 4, lq), jnp.float32)
  fns = [(lambda q, k, v: mosaic.forward(q, k, v, mask, sm_scale=0.1), (q, kv, kv)),
         (lambda q, k, v, o, lse, do: mosaic.backward(q, k, v, o, lse, do, mask, sm_scale=0.1), (q, kv, kv, q, lse, q)),
         (lambda *a: mosaic.forward_jvp(*a, mask, sm_scale=0.1), (q, kv, kv, q, kv, kv)),
         (lambda q, k, v: mosaic.forward(q, k, v, mask, sm_scale=0.1, unpadded_o=True), (q, kv, kv))]
  for fn, args in fns:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
  for fwd in (fns[0][0], fns[3][0]):   # o padded and sliced, or written unpadded
    o, lse2 = jax.eval_shape(fwd, q, kv, kv)
    assert o.shape == q.shape and lse2.shape == (1, 4, lq)
  assert [g.shape for g in jax.eval_shape(fns[1][0], q, kv, kv, q, lse, q)] == [q.shape, kv.shape, kv.shape]


def test_mosaic_operand_rows():
  """GPU: rows padded to a multiple of 8 only (TMA zero-fills the rest); interpreter: to the tile multiple."""
  x = jnp.ones((1, 1260, 2, 8), jnp.bfloat16)
  assert mosaic._pad_len(x, 1280, None).shape[1] == 1264
  assert mosaic._pad_len(x, 1280, object()).shape[1] == 1280
  assert mosaic._pad_len(x[:, :1256], 1280, None).shape[1] == 1256        # already a multiple of 8: no copy
  padded = np.asarray(mosaic._pad_len(x, 1280, object()), np.float32)
  assert np.all(padded[:, 1260:] == 0) and np.all(padded[:, :1260] == 1)
  assert mosaic._out_len(65520, 65536, None) == 65520 and mosaic._out_len(65520, 65536, object()) == 65536


def _random_key_intervals(rng, lq, lk, r):
  """A static Mask whose rows all allow the same 0..r-1 random key intervals, and its KeyIntervals (r rows)."""
  n = min(int(rng.integers(0, r)), (lk + 1) // 2)
  pts = np.sort(rng.choice(lk + 1, 2 * n, replace=False)) if n else np.zeros(0, int)
  mask = Mask.from_ranges(lq, lk, [(0, lq, int(pts[2 * i]), int(pts[2 * i + 1])) for i in range(n)])
  return mask, KeyIntervals.from_mask(mask, r)


def test_runtime_key_intervals_give_the_static_masks_schedule_and_output():
  """KeyIntervals (a streamed chunk's mask as traced intervals): `runtime_schedule` builds, inside the graph, the
  row lists `tile_schedule` builds in numpy (any tiles, ragged lengths, empty masks); `flash_attention_stacked`
  under it equals the float64 reference, and one jitted function serves masks of different intervals."""
  rng = np.random.default_rng()
  edges = [[(0, 31)], [(0, 32)], [(1, 32), (64, 95)], [(32, 64), (65, 96)], [(31, 33)]]   # tile edges +-1 (bk=32)
  for trial in range(20 + len(edges)):
    if trial < len(edges):
      lq, lk, bq, bk = 50, 130, 16, 32
      mask = Mask.from_ranges(lq, lk, [(0, lq, a, b) for a, b in edges[trial]])
      iv = KeyIntervals.from_mask(mask, 4)
    else:
      lq, lk = int(rng.integers(1, 200)), int(rng.integers(1, 400))
      bq, bk = (int(rng.choice([16, 32, 64])) for _ in range(2))
      mask, iv = _random_key_intervals(rng, lq, lk, 4)
    lqp, lkp = -(-lq // bq) * bq, -(-lk // bk) * bk
    rs, ts = runtime_schedule(iv, lqp, lkp, bq, bk), tile_schedule(mask, lqp, lkp, bq, bk)
    np.testing.assert_array_equal(np.asarray(iv.to_dense()), mask.to_dense())
    np.testing.assert_array_equal(np.asarray(rs.kv_partial), ts.kv_partial)
    np.testing.assert_array_equal(np.asarray(rs.kv_full), ts.kv_full)
    for i in range(lqp // bq):
      n = int(ts.kv_partial[i] + ts.kv_full[i])
      np.testing.assert_array_equal(np.asarray(rs.kv_tiles)[i * rs.wq:i * rs.wq + n], ts.kv_tiles[i * ts.wq:][:n])
  n, b, lq, lk = 3, 2, 40, 96
  q = jnp.asarray(rng.standard_normal((b, lq, 2, 32)), jnp.float32)
  ks, vs = (jnp.asarray(rng.standard_normal((n, b, lk, 1, 32)), jnp.float32) for _ in range(2))
  fn = jax.jit(lambda q, k, v, i, m: pk.flash_attention_stacked(q, k, v, i, m))
  sizes = []
  for _ in range(4):
    mask, iv = _random_key_intervals(rng, lq, lk, 4)
    i = int(rng.integers(n))
    ref, run = _ref64(mask)
    assert _rel(fn(q, ks, vs, jnp.int32(i), iv), run(ref, q, ks[i], vs[i])) < TOL[jnp.float32]
    if not mask.ranges:
      assert np.all(np.asarray(fn(q, ks, vs, jnp.int32(i), iv)) == 0)   # nothing allowed: zeros, not NaN
    sizes.append(fn._cache_size())
  assert sizes[-1] == sizes[1] <= 2   # (a process's first trace may add a context value: one retrace at most)
  with pytest.raises(ValueError, match="intervals"):
    pk.flash_attention_stacked(q, ks, vs, 0, KeyIntervals((lq, lk + 1), np.zeros((2, 2), np.int32)))


def test_mosaic_forward_under_runtime_key_intervals_in_gpu_interpreter():
  """The Mosaic forward reads a KeyIntervals mask's in-graph lists (every key tile wide) on a KV stack: the same
  as the float64 reference, one executable for different intervals; its lowering for Hopper takes them as
  operands. Backward kernels refuse it."""
  plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
  rng = np.random.default_rng()
  n, b, lq, lk = 2, 1, 100, 384
  q = jnp.asarray(rng.standard_normal((b, lq, 2, 64)), jnp.bfloat16)
  ks, vs = (jnp.asarray(rng.standard_normal((n, b, lk, 1, 64)), jnp.bfloat16) for _ in range(2))
  lowered = jax.jit(lambda q, k, v, i, m: mosaic.forward(q, k, v, m, sm_scale=0.125, kv_index=i)[0]).trace(
      q, ks, vs, jnp.int32(0), _random_key_intervals(rng, lq, lk, 3)[1]).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()
  if not hasattr(plgpu, "InterpretGPUParams"):
    pytest.skip("this jax has no Mosaic GPU interpreter")
  fn = jax.jit(lambda q, k, v, i, m: mosaic.forward(q, k, v, m, sm_scale=0.125, kv_index=i,
                                                    interpret=plgpu.InterpretGPUParams())[0])
  sizes = []
  for _ in range(3):
    mask, iv = _random_key_intervals(rng, lq, lk, 3)
    i = int(rng.integers(n))
    ref, run = _ref64(mask, sm_scale=0.125)
    assert _rel(fn(q, ks, vs, jnp.int32(i), iv), run(ref, q, ks[i], vs[i])) < TOL[jnp.bfloat16]
    sizes.append(fn._cache_size())
  assert sizes[-1] == sizes[1] <= 2
  with pytest.raises(ValueError, match="forward only"):
    mosaic.backward(q, ks[0], vs[0], q, jnp.zeros((b, 2, lq), jnp.float32), q, iv, sm_scale=0.125)
