"""Wan2.1 DiT layers in Flax linen: embeddings, attention, feed-forward and the transformer block.

Module and parameter names mirror diffusers' `WanTransformer3DModel` so a checkpoint maps by a fixed rule:
`blocks.3.attn1.to_out.0.weight` -> `blocks_3/attn1/to_out_0/kernel` (transposed), `*.norm_q.weight` ->
`*/norm_q/scale`, `ffn.net.0.proj` -> `ffn/net_0/proj`, `norm2.weight/bias` -> `norm2/scale/bias`,
`patch_embedding.weight` [D, C, kt, kh, kw] -> `patch_embedding/kernel` [kt, kh, kw, C, D]. With
`scan_layers` the blocks are one `blocks` subtree with a leading layer axis (`wan.loop_to_scan_params`).

Precision (as Wan2.1 runs under autocast): params are fp32; dense layers and attention run in
`config.dtype`; the residual stream, LayerNorms, RMSNorms, time embeddings and AdaLN modulation stay in
(at least) fp32. "At least" keeps float64 intact for finite-difference tests.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.mask import Mask
from rcm_jax.models.attention import attention, stacked_attention
from rcm_jax.models.config import WanConfig
from rcm_jax.models.rope import apply_rope

# Wan2.1 init: xavier-uniform linears with zero bias, N(0, 0.02) for the time and text embedders.
_xavier = nn.initializers.xavier_uniform()
_embed_init = nn.initializers.normal(0.02)


def at_least_f32(x):
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def dense(features: int, name: str, dtype=None, kernel_init=_xavier) -> nn.Dense:
  """nn.Dense with fp32 params; dtype=None computes in the (promoted) input/param dtype."""
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
                  bias_init=nn.initializers.zeros, name=name)


def layer_norm(eps: float, affine: bool, name: str) -> nn.LayerNorm:
  """FP32LayerNorm: statistics and output in (at least) fp32; feed it `at_least_f32(x)`."""
  return nn.LayerNorm(epsilon=eps, use_bias=affine, use_scale=affine, use_fast_variance=False, dtype=None,
                      param_dtype=jnp.float32, name=name)


def timestep_embedding(timesteps, dim: int, max_period: float = 10000.0):
  """Sinusoidal embedding, cos first (diffusers `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`).

  timesteps: [...] (the network's 1000 * t) -> [..., dim] in (at least) fp32.
  """
  half = dim // 2
  t = at_least_f32(jnp.asarray(timesteps))
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=t.dtype) / half)
  args = t[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedding(nn.Module):
  """diffusers `TimestepEmbedding`: linear_1 -> silu -> linear_2, in fp32."""
  dim: int

  @nn.compact
  def __call__(self, x):
    x = dense(self.dim, "linear_1", kernel_init=_embed_init)(at_least_f32(x))
    return dense(self.dim, "linear_2", kernel_init=_embed_init)(nn.silu(x))


def _last_dim_matmul(x, w):  # x [..., Din] @ w [Din, Dout]
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_jvp
def fused_linears(x, kernels, biases):
  """x [..., Din] -> tuple(x @ kernels[i] + biases[i]): one GEMM against the concatenated kernels, split.

  The tangent (and so, transposed, the backward pass) takes one product per linear instead of the fused one:
  the fused product's cotangent would be the concatenation of the outputs' cotangents, which XLA wrote out
  ([tokens, 3 D] twice a layer in the Wan TF step) before the two backward GEMMs. Tangents that are symbolic
  zeros (the params under `jax.jvp` in sCM) cost no product."""
  y = _last_dim_matmul(x, jnp.concatenate(kernels, axis=1)) + jnp.concatenate(biases)
  return tuple(jnp.split(y, np.cumsum([k.shape[1] for k in kernels])[:-1].tolist(), axis=-1))


def _fused_linears_jvp(primals, tangents):
  x, kernels, biases = primals
  tx, tkernels, tbiases = tangents
  outs = fused_linears(x, kernels, biases)
  zero = lambda t: isinstance(t, jax.custom_derivatives.SymbolicZero)
  touts = []
  for out, kernel, tk, tb in zip(outs, kernels, tkernels, tbiases):
    terms = ([] if zero(tx) else [_last_dim_matmul(tx, kernel)]) + (
        [] if zero(tk) else [_last_dim_matmul(x, tk)]) + ([] if zero(tb) else [jnp.broadcast_to(tb, out.shape)])
    touts.append(sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out))
  return outs, tuple(touts)


fused_linears.defjvp(_fused_linears_jvp, symbolic_zeros=True)


class TextProjection(nn.Module):
  """diffusers `PixArtAlphaTextProjection(act_fn="gelu_tanh")`: linear_1 -> gelu(tanh) -> linear_2."""
  dim: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    x = dense(self.dim, "linear_1", self.dtype, _embed_init)(x)
    return dense(self.dim, "linear_2", self.dtype, _embed_init)(nn.gelu(x, approximate=True))


class WanConditionEmbedder(nn.Module):
  """diffusers `WanTimeTextImageEmbedding` (no image branch): time embedding, time projection, text projection."""
  config: WanConfig

  def setup(self):
    cfg = self.config
    self.time_embedder = TimestepEmbedding(cfg.dim)
    self.time_proj = dense(6 * cfg.dim, "time_proj")
    self.text_embedder = TextProjection(cfg.dim, cfg.compute_dtype)

  def embed_time(self, timesteps):
    """timesteps: [B, F] (1000 * t) -> temb [B, F, D] fp32."""
    return self.time_embedder(timestep_embedding(timesteps, self.config.freq_dim))

  def project_time(self, temb):
    """temb [B, F, D] -> timestep_proj [B, F, 6, D] fp32 (the six AdaLN vectors of every block)."""
    proj = self.time_proj(nn.silu(at_least_f32(temb)))
    return proj.reshape(*proj.shape[:-1], 6, self.config.dim)

  def embed_text(self, context):
    """context [B, Lc, text_dim] -> [B, Lc, D] in the compute dtype."""
    return self.text_embedder(context)


class WanAttention(nn.Module):
  """diffusers `WanAttention`: q/k/v/out linears, RMSNorm on q and k across all heads, RoPE for self-attention.

  Split into `project_qkv` (q, k, v with RoPE at given positions) and `attend` (attention against any k/v,
  then the output linear), so a KV-cache rollout can concatenate cached k/v between the two.
  """
  config: WanConfig

  def setup(self):
    cfg = self.config
    dt = cfg.compute_dtype
    self.to_q = dense(cfg.dim, "to_q", dt)
    self.to_k = dense(cfg.dim, "to_k", dt)
    self.to_v = dense(cfg.dim, "to_v", dt)
    self.to_out_0 = dense(cfg.dim, "to_out_0", dt)
    if cfg.qk_norm:
      self.norm_q = nn.RMSNorm(epsilon=cfg.eps, dtype=None, param_dtype=jnp.float32)
      self.norm_k = nn.RMSNorm(epsilon=cfg.eps, dtype=None, param_dtype=jnp.float32)
    else:
      self.norm_q = self.norm_k = None

  def _heads(self, x):  # [B, L, D] -> [B, L, H, Dh]
    return x.reshape(*x.shape[:-1], self.config.num_heads, self.config.head_dim)

  @staticmethod
  def _norm(norm, x):  # RMSNorm over all heads at once (qk_norm="rms_norm_across_heads"), in fp32
    return x if norm is None else norm(at_least_f32(x)).astype(x.dtype)

  def project_q(self, x):
    """x [B, L, D] -> q [B, L, H, Dh] (no RoPE)."""
    return self._heads(self._norm(self.norm_q, self.to_q(x)))

  def project_kv(self, source):
    """source [B, Lk, D] -> k, v [B, Lk, H, Dh] (no RoPE)."""
    return self._heads(self._norm(self.norm_k, self.to_k(source))), self._heads(self.to_v(source))

  def _qkv_linear(self, x):
    """to_q, to_k, to_v of the same x [B, L, D] as one GEMM against their concatenated kernels -> three
    [B, L, D] (`fused_linears`). The same products as three Dense calls (each output column is the same dot) in
    one [D, 3D] GEMM: on an H100 the Wan TF training step ran 1% faster; a 4,680-token streaming chunk's GEMM
    went from 347 TFLOP/s (each of three) to 411, within the cards' noise end to end (benchmarks/RESULTS.md)."""
    if self.is_initializing():
      return self.to_q(x), self.to_k(x), self.to_v(x)
    dt = self.config.compute_dtype
    ps = [m.variables["params"] for m in (self.to_q, self.to_k, self.to_v)]
    return fused_linears(x.astype(dt), tuple(p["kernel"].astype(dt) for p in ps),
                         tuple(p["bias"].astype(dt) for p in ps))

  def project_qkv_raw(self, x):
    """Self-attention projections before RoPE: x [B, L, D] -> q, k, v [B, L, H, Dh] (q, k RMS-normed)."""
    q, k, v = self._qkv_linear(x)
    return (self._heads(self._norm(self.norm_q, q)), self._heads(self._norm(self.norm_k, k)), self._heads(v))

  def project_qkv(self, x, cos, sin):
    """Self-attention inputs. x [B, L, D]; cos/sin [L, Dh/2] at the tokens' positions -> q, k, v [B, L, H, Dh]."""
    q, k, v = self.project_qkv_raw(x)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return checkpoint_name(q, "query"), checkpoint_name(k, "key"), checkpoint_name(v, "value")

  def attend(self, q, k, v, mask: Mask | None = None, *, tag: str | None = None, layer=None):
    """q [B, Lq, H, Dh], k/v [B, Lk, H, Dh] -> [B, Lq, D] after the output linear. layer (int32, may be traced):
    k/v are stacks [N, B, Lk, H, Dh] and entry `layer` is attended in place (`stacked_attention`)."""
    if layer is None:
      o = attention(q, k, v, mask, impl=self.config.attention_impl)
    else:
      o = stacked_attention(q, k, v, layer, mask, impl=self.config.attention_impl)
    if tag is not None:
      o = checkpoint_name(o, tag)
    return self.to_out_0(o.reshape(*o.shape[:2], self.config.dim))

  def self_attention(self, x, cos, sin, mask: Mask | None = None):
    q, k, v = self.project_qkv(x, cos, sin)
    return self.attend(q, k, v, mask, tag="attention_out")

  def cached_self_attention(self, x, cos, sin, mask: Mask | None, cache_k, cache_v, cache_cos=None,
                            cache_sin=None, write_at: int | None = None, chunk_at: int | None = None,
                            layer=None):
    """Self-attention of a chunk against a KV cache (`rcm_jax.inference.rollout`) plus itself.

    x [B, Lq, D] chunk tokens; cos/sin [Lq, Dh/2] at the chunk's positions; cache_k/cache_v [B, S, H, Dh].
    Keys in the cache are post-RoPE (cache_cos is None) or pre-RoPE, rotated here at cache_cos/sin [S, Dh/2].
    mask: [Lq, S + Lq] over keys `[cache | chunk]`. write_at: token offset (may be traced) where the chunk's
    k/v are written into the cache (same RoPE convention), or None. Returns (out [B, Lq, D], (new_k, new_v)).

    In place (chunk_at and layer, ints that may be traced; post-RoPE keys in the compute dtype):
    cache_k/cache_v are every layer's stacks [layers, B, S, H, Dh] with free rows [chunk_at, chunk_at + Lq)
    for the chunk, and this is entry `layer`. The chunk's k/v are written into those rows and the attention
    reads the stack itself under `mask` [Lq, S]: no [cache | chunk] concatenation and no slice of the layer's
    cache, each of which would copy it every call. The returned stacks keep the chunk's rows written; write_at
    must be None (`WanModel` moves every layer's rows to their slot after the last layer: a second write per
    layer, after the read, makes XLA copy the whole stack).
    """
    q, k_raw, v = self.project_qkv_raw(x)
    q, k = apply_rope(q, cos, sin), apply_rope(k_raw, cos, sin)
    if chunk_at is not None:
      if cache_cos is not None or layer is None or write_at is not None or cache_k.dtype != k.dtype:
        raise ValueError(f"chunk_at (the chunk's k/v in the cache buffer) needs post-RoPE cached keys, a layer "
                         f"index, no write_at and a cache in the compute dtype {k.dtype} (got {cache_k.dtype}).")
      put = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[None], (layer, 0, chunk_at, 0, 0))
      cache_k, cache_v = put(cache_k, k), put(cache_v, v)
      return self.attend(q, cache_k, cache_v, mask, layer=layer), (cache_k, cache_v)
    keys_cache = cache_k if cache_cos is None else apply_rope(cache_k, cache_cos, cache_sin)
    out = self.attend(q, jnp.concatenate([keys_cache.astype(k.dtype), k], axis=1),
                      jnp.concatenate([cache_v.astype(v.dtype), v], axis=1), mask)
    if write_at is None:
      return out, (cache_k, cache_v)
    stored = k if cache_cos is None else k_raw
    new_k = jax.lax.dynamic_update_slice(cache_k, stored.astype(cache_k.dtype), (0, write_at, 0, 0))
    new_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, write_at, 0, 0))
    return out, (new_k, new_v)

  def cross_attention(self, x, context):
    """x [B, L, D] queries, context [B, Lc, D] keys/values, no RoPE, no mask."""
    k, v = self.project_kv(context)
    return self.attend(self.project_q(x), k, v)


_GELU_C, _GELU_A = math.sqrt(2 / math.pi), 0.044715


@jax.custom_jvp
def gelu_tanh(x):
  """gelu(tanh) as `nn.gelu(x, approximate=True)`, whose derivative recomputes its own tanh in fp32.

  Under autodiff the primal's tanh was shared with the derivative, so XLA wrote it out ([tokens, ffn], the
  largest activation of a Wan block) and read it back in the backward pass. Here the derivative takes its tanh
  of an fp32 argument, which XLA's CSE does not merge with the primal's, so it is computed where it is used.
  A custom_jvp (not custom_vjp) keeps `jax.jvp` working for sCM / MeanFlow."""
  return nn.gelu(x, approximate=True)


@gelu_tanh.defjvp
def _gelu_tanh_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  xf = at_least_f32(x)
  th = jnp.tanh(_GELU_C * (xf + _GELU_A * xf ** 3))
  slope = 0.5 * (1 + th) + 0.5 * xf * (1 - th * th) * _GELU_C * (1 + 3 * _GELU_A * xf * xf)
  return gelu_tanh(x), (slope * t).astype(t.dtype)


class GELU(nn.Module):
  """diffusers `GELU(approximate="tanh")`: a linear `proj`, then gelu(tanh)."""
  features: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    return gelu_tanh(dense(self.features, "proj", self.dtype)(x))


class FeedForward(nn.Module):
  """diffusers `FeedForward(activation_fn="gelu-approximate")`: net_0 (GELU proj) -> net_2 (linear)."""
  config: WanConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    h = GELU(cfg.ffn_dim, cfg.compute_dtype, name="net_0")(x)
    return dense(cfg.dim, "net_2", cfg.compute_dtype)(h)


def _scale_shift_init(dim: int):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, dtype) / dim ** 0.5
  return init


class WanBlock(nn.Module):
  """diffusers `WanTransformerBlock`: AdaLN self-attention, cross-attention, AdaLN feed-forward.

  The six modulation vectors come from `scale_shift_table` (1, 6, D) + the block-shared time projection, one
  set per frame, broadcast over that frame's tokens. `mask` is the static self-attention mask.
  """
  config: WanConfig
  mask: Mask | None = None
  chunk_at: int | None = None   # KV-cache path: the chunk's rows in the cache buffer (may be traced; see
                                # `cached_self_attention`)

  @nn.compact
  def __call__(self, x, context, timestep_proj, cos, sin, cache=None, cache_rope=None, write_at=None, layer=None):
    """x: [B, L, D] residual stream (>= fp32), L = F * S tokens frame-major; context: [B, Lc, D] or None;
    timestep_proj: [B, F, 6, D]; cos/sin: [L, Dh/2]. Returns the new residual stream [B, L, D].

    With `cache` = (k, v) [B, Sc, H, Dh] (this layer's KV cache; `mask` is then [L, Sc + L], or [L, Sc] with
    `chunk_at`): returns (residual stream, new cache). cache_rope: None (keys cached post-RoPE) or (cos, sin)
    [Sc, Dh/2] to rotate pre-RoPE cached keys; write_at: token slot where this chunk's k/v are written, or
    None. With `chunk_at`, cache is every layer's stacks and `layer` this block's index in them.

    context may also be this layer's cross-attention (k, v) [B, Lc, H, Dh], projected once for many calls
    (`WanModel(return_cross_kv=True)`). x=None returns that pair for `context` [B, Lc, D] and nothing else."""
    cfg = self.config
    dt = cfg.compute_dtype
    if x is None:
      return WanAttention(cfg, name="attn2").project_kv(context)
    b, length, d = x.shape
    num_frames = timestep_proj.shape[1]
    table = self.param("scale_shift_table", _scale_shift_init(cfg.dim), (1, 6, cfg.dim), jnp.float32)
    mod = table[None] + at_least_f32(timestep_proj)                      # [B, F, 6, D]
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (mod[:, :, i] for i in range(6))

    def per_frame(h):  # [B, L, D] -> [B, F, S, D]
      return h.reshape(b, num_frames, length // num_frames, d)

    def modulate(h, shift, scale):  # AdaLN in fp32, then to the compute dtype
      h = per_frame(h) * (1 + scale[:, :, None]) + shift[:, :, None]
      return h.reshape(b, length, d).astype(dt)

    def gated(h, gate):
      return (per_frame(at_least_f32(h)) * gate[:, :, None]).reshape(b, length, d)

    # 1. self-attention
    h = modulate(layer_norm(cfg.eps, False, "norm1")(x), shift_msa, scale_msa)
    attn1 = WanAttention(cfg, name="attn1")
    if cache is None:
      x = x + gated(attn1.self_attention(h, cos, sin, self.mask), gate_msa)
    else:
      ccos, csin = (None, None) if cache_rope is None else cache_rope
      o, cache = attn1.cached_self_attention(h, cos, sin, self.mask, *cache, ccos, csin, write_at, self.chunk_at,
                                             layer)
      x = x + gated(o, gate_msa)
    # 2. cross-attention (no gate, no modulation)
    if context is not None:
      h = (layer_norm(cfg.eps, True, "norm2")(x) if cfg.cross_attn_norm else x).astype(dt)
      attn2 = WanAttention(cfg, name="attn2")
      if isinstance(context, tuple):   # (k, v) projected beforehand
        x = x + at_least_f32(attn2.attend(attn2.project_q(h), *context))
      else:
        x = x + at_least_f32(attn2.cross_attention(h, context))
    # 3. feed-forward
    h = modulate(layer_norm(cfg.eps, False, "norm3")(x), c_shift_msa, c_scale_msa)
    x = x + gated(FeedForward(cfg, name="ffn")(h), c_gate_msa)
    return x if cache is None else (x, cache)
