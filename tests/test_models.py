"""Wan2.1 DiT: shapes, per-frame times, causality under block-causal and teacher-forcing masks, JVP vs finite
differences, scan/remat equivalence, bf16, parameter count of Wan2.1-1.3B, and config validation."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rcm_jax.models import (WanModel, attention, build_model, count_params, get_config, init_params,
                            loop_to_scan_params, masks, remat_policy, scan_to_loop_params)

B, H, W = 2, 4, 4           # 2 x 2 patches per frame with patch (1, 2, 2)
TPF = (H // 2) * (W // 2)   # tokens per frame
NF = 5                      # latent frames; pattern c1-2: blocks [0], [1, 2], [3, 4]
PATTERN = dict(first_chunk_frames=1, chunk_frames=2)
CFG = get_config("tiny", num_classes=3, num_actions=3)


def _randomize(params, key, scale=0.2):
  """Perturb every leaf so nothing is zero (Wan zero-initialises the output head and action embedding).

  numpy noise: eager jax.random would compile one kernel per leaf shape."""
  rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2 ** 30)))
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(np.asarray(p) + scale * rng.standard_normal(p.shape), p.dtype), params)


@functools.lru_cache(maxsize=None)
def _params(cfg):
  return _randomize(init_params(cfg, jax.random.key(0)), jax.random.key(1))


@functools.lru_cache(maxsize=None)
def _labels_fn(cfg, mask):
  """jit(apply) with labels/actions/frame_positions (traced); the static mask is closed over."""
  model = WanModel(cfg)
  return jax.jit(lambda p, x, t, labels, actions, pos: model.apply(
      {"params": p}, x, t, labels=labels, actions=actions, mask=mask, frame_positions=pos))


def _inputs(key, nf=NF, cfg=CFG):
  kx, kt, kl, ka = jax.random.split(key, 4)
  x = jax.random.normal(kx, (B, nf, H, W, cfg.in_channels))
  t = jax.random.uniform(kt, (B, nf), minval=0.1, maxval=0.9)
  labels = jax.random.randint(kl, (B, 2), 0, cfg.num_classes)
  actions = jax.random.randint(ka, (B, nf), 0, cfg.num_actions)
  return x, t, labels, actions


def _frame_diff(a, b):
  """Max |a - b| per frame: [T]."""
  return np.asarray(jnp.abs(a - b).max(axis=(0, 2, 3, 4)))


def _assert_changed(diff, changed, n):
  for f in range(n):
    if f in changed:
      assert diff[f] > 1e-4, (f, diff)
    else:
      assert diff[f] <= 1e-6, (f, diff)


# --- shapes, dtypes, conditioning ---

def test_shapes_and_dtypes():
  cfg = get_config("tiny")
  model = WanModel(cfg)
  x = jax.random.normal(jax.random.key(2), (B, 3, H, W, cfg.in_channels))
  ctx = jax.random.normal(jax.random.key(3), (B, 5, cfg.text_dim))
  params = init_params(cfg, jax.random.key(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  fn = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, context=ctx))
  out = fn(_randomize(params, jax.random.key(1)), x, jnp.full((B, 3), 0.3))
  assert out.shape == (B, 3, H, W, cfg.out_channels) and out.dtype == jnp.float32
  # at init the output head is zero (Wan's init), so the velocity starts at 0
  assert float(jnp.abs(fn(params, x, jnp.full((B, 3), 0.3))).max()) == 0.0


def test_no_context_and_i2v_channels():
  cfg = get_config("tiny", cond_channels=2)
  model = WanModel(cfg)
  x = jax.random.normal(jax.random.key(2), (1, 2, H, W, cfg.in_channels))
  y = jax.random.normal(jax.random.key(3), (1, 2, H, W, 2))
  variables = model.init(jax.random.key(0), x, jnp.zeros((1, 2)), y=y)   # no context at init
  assert "attn2" in variables["params"]["blocks_0"]                        # same tree as with context
  params = _randomize(variables["params"], jax.random.key(1))
  out = model.apply({"params": params}, x, jnp.full((1, 2), 0.5), y=y)
  assert out.shape == (1, 2, H, W, cfg.out_channels)
  # one time per sample ([B]) is the same as that time on every frame
  np.testing.assert_allclose(model.apply({"params": params}, x, jnp.full((1,), 0.5), y=y), out, atol=1e-6)
  out2 = model.apply({"params": params}, x, jnp.full((1, 2), 0.5), y=y + 1.0)
  assert float(jnp.abs(out2 - out).max()) > 1e-4
  with pytest.raises(ValueError, match="cond_channels"):
    model.apply({"params": params}, x, jnp.full((1, 2), 0.5))


def test_labels_and_actions_condition():
  mask = masks.block_causal(NF, TPF, **PATTERN)
  fn, p = _labels_fn(CFG, mask), _params(CFG)
  x, t, labels, actions = _inputs(jax.random.key(4))
  pos = jnp.arange(NF)
  out = fn(p, x, t, labels, actions, pos)
  assert float(jnp.abs(fn(p, x, t, (labels + 1) % 3, actions, pos) - out).max()) > 1e-4
  # a different action at frame 3 (block 2) changes that block only
  _assert_changed(_frame_diff(fn(p, x, t, labels, actions.at[:, 3].add(1) % 3, pos), out), {3, 4}, NF)
  # the action embedding is zero at init: a fresh model ignores actions
  p0 = init_params(CFG, jax.random.key(0))
  p0 = dict(p0, proj_out=_params(CFG)["proj_out"])
  np.testing.assert_array_equal(fn(p0, x, t, labels, actions, pos), fn(p0, x, t, labels, (actions + 1) % 3, pos))


# --- causality ---

def test_per_frame_times_block_causal():
  mask = masks.block_causal(NF, TPF, **PATTERN)
  fn, p = _labels_fn(CFG, mask), _params(CFG)
  x, t, labels, actions = _inputs(jax.random.key(5))
  pos = jnp.arange(NF)
  out = fn(p, x, t, labels, actions, pos)
  _assert_changed(_frame_diff(fn(p, x, t.at[:, 1].set(0.95), labels, actions, pos), out), {1, 2, 3, 4}, NF)
  _assert_changed(_frame_diff(fn(p, x, t.at[:, 4].set(0.95), labels, actions, pos), out), {3, 4}, NF)


def test_block_causal_perturbation():
  mask = masks.block_causal(NF, TPF, **PATTERN)
  fn, p = _labels_fn(CFG, mask), _params(CFG)
  x, t, labels, actions = _inputs(jax.random.key(6))
  pos = jnp.arange(NF)
  out = fn(p, x, t, labels, actions, pos)
  noise = jax.random.normal(jax.random.key(7), x.shape)
  for frames, changed in (((1, 2), {1, 2, 3, 4}), ((3, 4), {3, 4}), ((0,), set(range(NF)))):
    x2 = x.at[:, frames].add(noise[:, frames])
    _assert_changed(_frame_diff(fn(p, x2, t, labels, actions, pos), out), changed, NF)


def _tf_inputs(key):
  x, t, labels, actions = _inputs(key)
  x_clean, x_noisy = x, jax.random.normal(jax.random.fold_in(key, 1), x.shape)
  packed = jnp.concatenate([x_clean, x_noisy], axis=1)
  t_packed = jnp.concatenate([jnp.zeros_like(t), t], axis=1)
  a_packed = jnp.concatenate([actions, actions], axis=1)
  pos = jnp.concatenate([jnp.arange(NF), jnp.arange(NF)])   # same RoPE positions for both halves
  return x_clean, x_noisy, t, labels, actions, packed, t_packed, a_packed, pos


def test_teacher_forcing_perturbation():
  mask = masks.teacher_forcing(NF, TPF, **PATTERN)
  fn, p = _labels_fn(CFG, mask), _params(CFG)
  _, _, _, labels, _, packed, t_packed, a_packed, pos = _tf_inputs(jax.random.key(8))
  out = fn(p, packed, t_packed, labels, a_packed, pos)
  noise = jax.random.normal(jax.random.key(9), packed.shape)
  cases = [  # (perturbed packed frames, frames whose output must change); clean = 0..4, noisy = 5..9
      ((6, 7), {6, 7}),                  # noisy block 1: only itself
      ((8, 9), {8, 9}),                  # noisy block 2
      ((5,), {5}),                       # noisy block 0
      ((1, 2), {1, 2, 3, 4, 8, 9}),      # clean block 1: clean blocks >= 1, noisy blocks > 1
      ((0,), {0, 1, 2, 3, 4, 6, 7, 8, 9}),  # clean block 0: everything but noisy block 0
  ]
  for frames, changed in cases:
    x2 = packed.at[:, frames].add(noise[:, frames])
    _assert_changed(_frame_diff(fn(p, x2, t_packed, labels, a_packed, pos), out), changed, 2 * NF)


def test_teacher_forcing_equals_causal_on_mixed_sequence():
  """Noisy block i under teacher forcing == block-causal model on [clean blocks < i, noisy block i]."""
  tf_fn = _labels_fn(CFG, masks.teacher_forcing(NF, TPF, **PATTERN))
  bc_fn = _labels_fn(CFG, masks.block_causal(NF, TPF, **PATTERN))
  p = _params(CFG)
  x_clean, x_noisy, t, labels, actions, packed, t_packed, a_packed, pos = _tf_inputs(jax.random.key(10))
  out_tf = tf_fn(p, packed, t_packed, labels, a_packed, pos)
  for f0, f1 in masks.block_frame_ranges(NF, **PATTERN):
    x_mix = x_clean.at[:, f0:f1].set(x_noisy[:, f0:f1])
    t_mix = jnp.zeros_like(t).at[:, f0:f1].set(t[:, f0:f1])
    out_bc = bc_fn(p, x_mix, t_mix, labels, actions, jnp.arange(NF))
    np.testing.assert_allclose(out_tf[:, NF + f0:NF + f1], out_bc[:, f0:f1], atol=2e-5, rtol=1e-5)
  # and the clean half of teacher forcing is the block-causal model on the clean video
  out_clean = bc_fn(p, x_clean, jnp.zeros_like(t), labels, actions, jnp.arange(NF))
  np.testing.assert_allclose(out_tf[:, :NF], out_clean, atol=2e-5, rtol=1e-5)


# --- transforms and numerics ---

def test_jvp_matches_central_difference_float64():
  with jax.enable_x64(True):
    cfg = CFG.replace(dtype="float64")
    mask = masks.block_causal(3, TPF, first_chunk_frames=1, chunk_frames=1)
    model = WanModel(cfg)
    p = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), _params(CFG))
    x, t, labels, actions = _inputs(jax.random.key(11), nf=3)
    x, t = x.astype(jnp.float64), t.astype(jnp.float64)
    dx = jax.random.normal(jax.random.key(12), x.shape, jnp.float64)
    # The network sees 1000 * t inside cos/sin: with a unit t-tangent the finite difference's truncation
    # error (h^2 times a third derivative of order 1e9) dominates; a 1e-3 tangent weighs x and t alike.
    dt = 1e-3 * jax.random.uniform(jax.random.key(13), t.shape, jnp.float64)

    def f(x, t):
      return model.apply({"params": p}, x, t, labels=labels, actions=actions, mask=mask)

    out, tangent = jax.jit(lambda x, t: jax.jvp(f, (x, t), (dx, dt)))(x, t)
    assert out.dtype == jnp.float64 and tangent.dtype == jnp.float64
    f_jit, h = jax.jit(f), 1e-5
    fd = (f_jit(x + h * dx, t + h * dt) - f_jit(x - h * dx, t - h * dt)) / (2 * h)
    scale = float(jnp.abs(tangent).max())
    assert scale > 1e-3
    np.testing.assert_allclose(np.asarray(tangent), np.asarray(fd), atol=1e-7 * scale, rtol=1e-6)
  assert jnp.zeros(()).dtype == jnp.float32  # x64 did not leak


def test_gelu_tanh_derivatives_match_nn_gelu_float64():
  """The feed-forward's gelu(tanh) with its own fp32 derivative: value, grad, jvp and a second derivative
  equal nn.gelu's (float64, random inputs over the range where tanh bends); bf16 grads meet the fp32 ones."""
  from rcm_jax.models.layers import gelu_tanh
  ref = functools.partial(jax.nn.gelu, approximate=True)
  rng = np.random.default_rng()
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal(4096) * 4)
    t = jnp.asarray(rng.standard_normal(4096))
    np.testing.assert_allclose(gelu_tanh(x), ref(x), rtol=1e-15, atol=1e-15)
    for f in (lambda g: jax.vmap(jax.grad(g)), lambda g: jax.vmap(jax.grad(jax.grad(g)))):
      np.testing.assert_allclose(f(gelu_tanh)(x), f(ref)(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(jax.jvp(gelu_tanh, (x,), (t,))[1], jax.jvp(ref, (x,), (t,))[1], rtol=1e-12,
                               atol=1e-12)
  xb = jnp.asarray(rng.standard_normal(4096) * 4, jnp.bfloat16)
  gb = jax.grad(lambda x: jnp.sum(gelu_tanh(x).astype(jnp.float32)))(xb)
  assert gb.dtype == jnp.bfloat16
  g32 = jax.vmap(jax.grad(ref))(xb.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(gb, np.float32), g32, rtol=1e-2, atol=1e-2)


def test_fused_linears_equal_separate_linears_float64():
  """layers.fused_linears (the q/k/v projection as one GEMM): value, jvp in x alone, in the kernels alone and in
  everything, and grads equal three separate x @ W + b (float64, random shapes). Its backward pass holds no
  concatenation of the outputs' cotangents (only the forward's [Din, sum Dout] kernel concatenation)."""
  from rcm_jax.models.layers import fused_linears
  rng = np.random.default_rng()
  din, douts = int(rng.integers(3, 9)), tuple(int(d) for d in rng.integers(2, 7, size=3))
  sep = lambda x, ks, bs: tuple(x @ k + b for k, b in zip(ks, bs))
  with jax.enable_x64(True):
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape))
    x, tx = arr(2, 5, din), arr(2, 5, din)
    ks, tks = tuple(arr(din, d) for d in douts), tuple(arr(din, d) for d in douts)
    bs, tbs = tuple(arr(d) for d in douts), tuple(arr(d) for d in douts)
    close = lambda a, b: [np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-12) for u, v in zip(a, b)]
    close(fused_linears(x, ks, bs), sep(x, ks, bs))
    close(jax.jvp(lambda x: fused_linears(x, ks, bs), (x,), (tx,))[1], jax.jvp(lambda x: sep(x, ks, bs), (x,), (tx,))[1])
    close(jax.jvp(lambda k: fused_linears(x, k, bs), (ks,), (tks,))[1], jax.jvp(lambda k: sep(x, k, bs), (ks,), (tks,))[1])
    close(jax.jvp(fused_linears, (x, ks, bs), (tx, tks, tbs))[1], jax.jvp(sep, (x, ks, bs), (tx, tks, tbs))[1])
    weights = [arr(2, 5, d) for d in douts]
    loss = lambda f: lambda *a: sum(jnp.sum(w * y ** 2) for w, y in zip(weights, f(*a)))
    g, g_ref = jax.grad(loss(fused_linears), (0, 1, 2))(x, ks, bs), jax.grad(loss(sep), (0, 1, 2))(x, ks, bs)
    close(jax.tree.leaves(g), jax.tree.leaves(g_ref))
    hlo = jax.jit(jax.grad(loss(fused_linears), (0, 1, 2))).lower(x, ks, bs).as_text()
    concats = [line for line in hlo.splitlines() if "concatenate" in line]
    assert any(f"tensor<{din}x{sum(douts)}xf64>" in line for line in concats)    # the forward's kernels
    assert not any(f"tensor<2x5x{sum(douts)}xf64>" in line for line in concats)  # no cotangent concatenation


def test_apply_rope_is_a_complex_rotation_without_concatenate():
  """apply_rope rotates each interleaved pair (x[2j], x[2j+1]) as the complex number x[2j] + i x[2j+1] times
  exp(i angle) (Wan's rope_apply), float64 against numpy, random positions; bf16 within rounding of that. Its
  lowered forward and gradient hold no concatenate (a stack of the halves made XLA write one per call)."""
  from rcm_jax.models.rope import apply_rope, rope_tables
  rng = np.random.default_rng()
  pos = rng.integers(0, 100, size=3)
  with jax.enable_x64(True):
    cos, sin = rope_tables(pos, 2, 3, head_dim=64)
    x = jnp.asarray(rng.standard_normal((2, 18, 3, 64)))
    z = np.asarray(x[..., 0::2]) + 1j * np.asarray(x[..., 1::2])
    rot = z * (np.asarray(cos) + 1j * np.asarray(sin))[None, :, None, :]
    want = np.stack([rot.real, rot.imag], axis=-1).reshape(x.shape)
    np.testing.assert_allclose(apply_rope(x, cos, sin), want, rtol=1e-12, atol=1e-12)
  cos32, sin32 = (jnp.asarray(np.asarray(t, np.float32)) for t in (cos, sin))
  xb = jnp.asarray(np.asarray(x, np.float32), jnp.bfloat16)
  got = apply_rope(xb, cos32, sin32)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)
  fwd = jax.jit(apply_rope).lower(xb, cos32, sin32).as_text()
  grad = jax.jit(jax.grad(lambda x: jnp.sum(apply_rope(x, cos32, sin32).astype(jnp.float32) ** 2))).lower(xb)
  assert "concatenate" not in fwd and "concatenate" not in grad.as_text()


def test_scan_and_remat_match_loop():
  mask = masks.block_causal(NF, TPF, **PATTERN)
  x, t, labels, actions = _inputs(jax.random.key(14))
  p_loop = _params(CFG)
  p_scan = loop_to_scan_params(p_loop, CFG.num_layers)
  assert p_scan["blocks"]["attn1"]["to_q"]["kernel"].shape == (CFG.num_layers, CFG.dim, CFG.dim)
  back = scan_to_loop_params(p_scan, CFG.num_layers)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), back, p_loop))

  def loss_and_grad(cfg, p):
    model = WanModel(cfg)
    loss = lambda p: jnp.mean(model.apply({"params": p}, x, t, labels=labels, actions=actions, mask=mask) ** 2)
    return jax.jit(jax.value_and_grad(loss))(p)

  ref_loss, ref_grad = loss_and_grad(CFG, p_loop)
  # remat changes what the backward pass stores, never the values: one scanned + remat run covers the
  # mechanism (the other policies differ only in the jax policy that remat_policy() returns)
  for scan, policy in ((True, "attention_only"),):
    cfg = CFG.replace(scan_layers=scan, remat_policy=policy)
    loss, grad = loss_and_grad(cfg, p_scan if scan else p_loop)
    if scan:
      grad = scan_to_loop_params(grad, CFG.num_layers)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), grad, ref_grad)


def test_remat_policies_by_name():
  assert remat_policy("none") == (False, None)
  for name in ("full", "dots_saveable", "attention_only", "attention_out_only"):
    use, policy = remat_policy(name)
    assert use and callable(policy)
  with pytest.raises(ValueError, match="remat_policy"):
    remat_policy("everything")


def test_bf16_compute_close_to_fp32():
  mask = masks.block_causal(NF, TPF, **PATTERN)
  x, t, labels, actions = _inputs(jax.random.key(15))
  p = _params(CFG)
  out32 = _labels_fn(CFG, mask)(p, x, t, labels, actions, jnp.arange(NF))
  out16 = _labels_fn(CFG.replace(dtype="bfloat16"), mask)(p, x, t, labels, actions, jnp.arange(NF))
  assert out16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert rel < 3e-2, rel


# --- attention entry point ---

def test_attention_entry_point():
  kq, kk, kv = jax.random.split(jax.random.key(16), 3)
  q = jax.random.normal(kq, (2, 6, 4, 8))
  k = jax.random.normal(kk, (2, 6, 2, 8))
  v = jax.random.normal(kv, (2, 6, 2, 8))
  mask = masks.block_causal(3, 2, first_chunk_frames=1, chunk_frames=1)
  # plain softmax attention written here, with grouped k/v heads repeated
  kr, vr = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, kr) / math.sqrt(8)
  s = jnp.where(jnp.asarray(mask.to_dense()), s, -jnp.inf)
  want = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), vr)
  np.testing.assert_allclose(attention(q, k, v, mask, impl="xla"), want, atol=1e-5)
  with pytest.raises(ValueError, match="xla.*pallas.*cudnn"):
    attention(q, k, v, impl="flash")
  # the Pallas branch dispatches to the flash kernel (interpret mode on CPU; head dims 64/128)
  try:
    from pallas_kernels import flash_attention  # noqa: F401
  except ImportError:
    pass
  else:
    q64, k64, v64 = (jnp.tile(a, (1, 1, 1, 8)) for a in (q, k, v))
    np.testing.assert_allclose(attention(q64, k64, v64, mask, impl="pallas"),
                               attention(q64, k64, v64, mask, impl="xla"), atol=1e-5)
  with pytest.raises(ValueError, match="pallas"):
    attention(q, k, v, mask, impl="cudnn")


# --- sizes and validation ---

def _analytic_count(dim, layers, ffn, heads, in_ch, out_ch, text_dim, freq_dim, patch):
  """Parameters of diffusers' WanTransformer3DModel (no image branch), counted from its __init__."""
  del heads  # head count does not change the parameter count
  lin = lambda i, o: i * o + o
  p = math.prod(patch)
  patch_embedding = in_ch * p * dim + dim                              # Conv3d weight + bias
  time_embedder = lin(freq_dim, dim) + lin(dim, dim)
  time_proj = lin(dim, 6 * dim)
  text_embedder = lin(text_dim, dim) + lin(dim, dim)
  attn = 4 * lin(dim, dim) + 2 * dim                                   # q, k, v, out + norm_q, norm_k
  block = 2 * attn + 2 * dim + lin(dim, ffn) + lin(ffn, dim) + 6 * dim  # attn1, attn2, norm2, ffn, table
  head = 2 * dim + lin(dim, out_ch * p)                                # scale_shift_table + proj_out
  return patch_embedding + time_embedder + time_proj + text_embedder + layers * block + head


def test_count_params_wan_1p3b_matches_analytic():
  want = _analytic_count(1536, 30, 8960, 12, 16, 16, 4096, 256, (1, 2, 2))
  assert want == 1_418_996_800  # Wan2.1-1.3B: "1.3B" / 1.42B
  assert count_params("wan_1p3b") == want
  tiny = get_config("tiny")
  n = sum(a.size for a in jax.tree_util.tree_leaves(init_params(tiny, jax.random.key(0))))
  assert count_params(tiny) == n == _analytic_count(tiny.dim, tiny.num_layers, tiny.ffn_dim, tiny.num_heads,
                                                    tiny.in_channels, tiny.out_channels, tiny.text_dim,
                                                    tiny.freq_dim, tiny.patch_size)


@pytest.mark.parametrize("overrides,key", [
    (dict(dim=50, num_heads=3), "dim"),                 # not divisible
    (dict(dim=128, num_heads=2), "num_heads"),          # head_dim 64: RoPE split disagrees with diffusers
    (dict(dim=42, num_heads=6), "num_heads"),           # head_dim 7: odd
    (dict(remat_policy="some"), "remat_policy"),
    (dict(attention_impl="flash"), "attention_impl"),
    (dict(dtype="int8"), "dtype"),
    (dict(patch_size=(1, 2)), "patch_size"),
    (dict(num_layerz=3), "num_layerz"),                 # unknown field
])
def test_bad_configs_name_the_key(overrides, key):
  with pytest.raises(ValueError, match=key):
    build_model("tiny", **overrides)


def test_bad_inputs_name_the_fix():
  with pytest.raises(ValueError, match="unknown model size.*tiny"):
    build_model("wan_2b")
  model = build_model("tiny")
  p = _params(get_config("tiny"))
  x = jnp.zeros((1, 2, 5, 4, 4))
  with pytest.raises(ValueError, match="patch_size"):
    model.apply({"params": p}, x, jnp.zeros((1, 2)))
  x = jnp.zeros((1, 2, 4, 4, 4))
  with pytest.raises(ValueError, match="tokens_per_frame"):
    model.apply({"params": p}, x, jnp.zeros((1, 2)), mask=masks.block_causal(3, TPF, **PATTERN))
  with pytest.raises(ValueError, match=r"t must be \[B, F\]"):
    model.apply({"params": p}, x, jnp.zeros((1, 3)))
  with pytest.raises(ValueError, match="num_classes"):
    model.apply({"params": p}, x, jnp.zeros((1, 2)), labels=jnp.zeros((1, 1), jnp.int32))


def test_param_names_map_from_diffusers_keys():
  """Every param is a diffusers `WanTransformer3DModel` state-dict key under one fixed renaming rule."""
  linears = ["condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2",
             "condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1",
             "condition_embedder.text_embedder.linear_2", "proj_out", "patch_embedding"]
  keys = [f"{m}.{w}" for m in linears for w in ("weight", "bias")] + ["scale_shift_table"]
  for i in range(2):
    for attn in ("attn1", "attn2"):
      keys += [f"blocks.{i}.{attn}.{m}.{w}" for m in ("to_q", "to_k", "to_v", "to_out.0") for w in ("weight", "bias")]
      keys += [f"blocks.{i}.{attn}.norm_q.weight", f"blocks.{i}.{attn}.norm_k.weight"]
    keys += [f"blocks.{i}.norm2.weight", f"blocks.{i}.norm2.bias", f"blocks.{i}.scale_shift_table"]
    keys += [f"blocks.{i}.ffn.{m}.{w}" for m in ("net.0.proj", "net.2") for w in ("weight", "bias")]

  def rename(key):  # "blocks.0.attn1.to_out.0.weight" -> "blocks_0/attn1/to_out_0/kernel"
    parts = []
    for p in key.split("."):
      if p.isdigit():
        parts[-1] += f"_{p}"
      else:
        parts.append(p)
    norm = len(parts) > 1 and "norm" in parts[-2]
    parts[-1] = {"weight": "scale" if norm else "kernel"}.get(parts[-1], parts[-1])
    return "/".join(parts)

  params = init_params("tiny", jax.random.key(0))
  ours = {"/".join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
  assert ours == {rename(k) for k in keys}


# --- an independent float64 numpy transcription of diffusers' WanTransformer3DModel.forward ---
# Channels-first like torch, weights in torch layout, per-token timesteps (diffusers' Wan2.2 ti2v branch,
# which is what one time per frame is). Checks layouts, modulation order, RoPE pairing and unpatchify: what a
# checkpoint loader must be able to rely on.

def _torch_state_dict(params):
  sd = {}
  for path, a in jax.tree_util.tree_leaves_with_path(params):
    names = [k.key for k in path]
    a = np.asarray(a, np.float64)
    leaf = names[-1]
    if leaf == "kernel":
      a = np.moveaxis(a, [-1, -2], [0, 1]) if a.ndim == 5 else a.T   # conv [kt,kh,kw,in,out] -> [out,in,kt,kh,kw]
      leaf = "weight"
    elif leaf == "scale":
      leaf = "weight"
    mods = [n.replace("blocks_", "blocks.").replace("to_out_0", "to_out.0").replace("net_0", "net.0")
            .replace("net_2", "net.2") for n in names[:-1]]
    sd[".".join(mods + [leaf])] = a
  return sd


def _np_diffusers_forward(sd, cfg, x, timestep, ctx):
  """x [B, C, F, H, W], timestep [B, L] (per token, 0..1000), ctx [B, Lc, text_dim] -> [B, C_out, F, H, W]."""
  lin = lambda h, name: h @ sd[name + ".weight"].T + sd[name + ".bias"]
  silu = lambda h: h / (1 + np.exp(-h))
  gelu_tanh = lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))

  def layer_norm(h, w=None, b=None):
    mu = h.mean(-1, keepdims=True)
    out = (h - mu) / np.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + cfg.eps)
    return out if w is None else out * w + b

  def rms_norm(h, w):
    return h / np.sqrt((h ** 2).mean(-1, keepdims=True) + cfg.eps) * w

  bsz, _, nf, hh, ww = x.shape
  pt, ph, pw = cfg.patch_size
  ppf, pph, ppw = nf // pt, hh // ph, ww // pw
  heads, hd = cfg.num_heads, cfg.head_dim
  # rope (WanRotaryPosEmbed)
  h_dim = w_dim = 2 * (hd // 6)
  t_dim = hd - h_dim - w_dim
  cos_l, sin_l = [], []
  for dim in (t_dim, h_dim, w_dim):
    freqs = 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2)[: dim // 2] / dim)
    ang = np.outer(np.arange(cfg.rope_max_seq_len), freqs)
    cos_l.append(np.repeat(np.cos(ang), 2, axis=1))
    sin_l.append(np.repeat(np.sin(ang), 2, axis=1))
  fc, fs = np.concatenate(cos_l, 1), np.concatenate(sin_l, 1)
  splits = np.cumsum([hd - 2 * (hd // 3), hd // 3])
  def grid(tab):
    f, h, w = np.split(tab, splits, axis=1)
    f = np.broadcast_to(f[:ppf, None, None], (ppf, pph, ppw, f.shape[1]))
    h = np.broadcast_to(h[None, :pph, None], (ppf, pph, ppw, h.shape[1]))
    w = np.broadcast_to(w[None, None, :ppw], (ppf, pph, ppw, w.shape[1]))
    return np.concatenate([f, h, w], -1).reshape(1, ppf * pph * ppw, 1, hd)
  rc, rs = grid(fc), grid(fs)

  def rope(h):
    x1, x2 = h[..., 0::2], h[..., 1::2]
    cos, sin = rc[..., 0::2], rs[..., 1::2]
    out = np.empty_like(h)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out

  def attn(prefix, h, enc, rotary):
    enc = h if enc is None else enc
    q, k, v = lin(h, prefix + ".to_q"), lin(enc, prefix + ".to_k"), lin(enc, prefix + ".to_v")
    q, k = rms_norm(q, sd[prefix + ".norm_q.weight"]), rms_norm(k, sd[prefix + ".norm_k.weight"])
    q, k, v = (a.reshape(*a.shape[:2], heads, hd) for a in (q, k, v))
    if rotary:
      q, k = rope(q), rope(k)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(*h.shape[:2], heads * hd)
    return lin(o, prefix + ".to_out.0")

  # patch embedding (Conv3d, kernel = stride)
  xr = x.reshape(bsz, x.shape[1], ppf, pt, pph, ph, ppw, pw)
  h = np.einsum("bcfphqwr,dcpqr->bdfhw", xr, sd["patch_embedding.weight"])
  h = h + sd["patch_embedding.bias"][None, :, None, None, None]
  h = h.reshape(bsz, cfg.dim, -1).transpose(0, 2, 1)
  # condition embedder (timestep [B, L] flattened, then unflattened)
  half = cfg.freq_dim // 2
  emb = timestep.reshape(-1)[:, None] * np.exp(-np.log(10000.0) * np.arange(half) / half)[None]
  emb = np.concatenate([np.cos(emb), np.sin(emb)], -1).reshape(bsz, -1, cfg.freq_dim)
  ce = "condition_embedder."
  temb = lin(silu(lin(emb, ce + "time_embedder.linear_1")), ce + "time_embedder.linear_2")
  tproj = lin(silu(temb), ce + "time_proj").reshape(bsz, -1, 6, cfg.dim)
  enc = lin(gelu_tanh(lin(ctx, ce + "text_embedder.linear_1")), ce + "text_embedder.linear_2")
  for i in range(cfg.num_layers):
    p = f"blocks.{i}"
    mod = sd[p + ".scale_shift_table"][None] + tproj
    sh, sc, g, csh, csc, cg = (mod[:, :, j] for j in range(6))
    h = h + attn(p + ".attn1", layer_norm(h) * (1 + sc) + sh, None, True) * g
    h = h + attn(p + ".attn2", layer_norm(h, sd[p + ".norm2.weight"], sd[p + ".norm2.bias"]), enc, False)
    ff = lin(gelu_tanh(lin(layer_norm(h) * (1 + csc) + csh, p + ".ffn.net.0.proj")), p + ".ffn.net.2")
    h = h + ff * cg
  mod = sd["scale_shift_table"][None] + temb[:, :, None]
  h = layer_norm(h) * (1 + mod[:, :, 1]) + mod[:, :, 0]
  h = lin(h, "proj_out").reshape(bsz, ppf, pph, ppw, pt, ph, pw, -1)
  h = h.transpose(0, 7, 1, 4, 2, 5, 3, 6)
  return h.reshape(bsz, h.shape[1], ppf * pt, pph * ph, ppw * pw)


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2)])
def test_matches_numpy_transcription_of_diffusers(patch):
  cfg = get_config("tiny", patch_size=patch, num_layers=2)
  params = _randomize(init_params(cfg, jax.random.key(0)), jax.random.key(1))
  nf = 4
  x = jax.random.normal(jax.random.key(2), (B, nf, H, W, cfg.in_channels))
  ctx = jax.random.normal(jax.random.key(3), (B, 3, cfg.text_dim))
  t = jax.random.uniform(jax.random.key(4), (B, nf // patch[0]))
  out = jax.jit(lambda p: WanModel(cfg).apply({"params": p}, x, t, context=ctx))(params)
  tokens_per_frame = (H // patch[1]) * (W // patch[2])
  timestep = np.repeat(1000.0 * np.asarray(t, np.float64), tokens_per_frame, axis=1)   # [B, L]
  want = _np_diffusers_forward(_torch_state_dict(params), cfg,
                               np.asarray(x, np.float64).transpose(0, 4, 1, 2, 3), timestep,
                               np.asarray(ctx, np.float64))
  want = want.transpose(0, 2, 3, 4, 1)
  np.testing.assert_allclose(np.asarray(out), want, atol=2e-4 * np.abs(want).max(), rtol=1e-4)
