"""The Wan2.1 DiT (`WanModel`), causal-capable: per-frame times, static attention masks, shared RoPE positions.

Follows diffusers' `WanTransformer3DModel` layer for layer (see `layers.py`), channels-last. Additions for
Causal-rCM: one timestep per latent frame (`t: [B, F]`), a `pallas_kernels.Mask` over the token sequence,
explicit RoPE frame positions (teacher forcing packs `[clean | noisy]` with the same positions twice), class
labels as context tokens and per-frame actions added to the time embedding (toy worlds), and an i2v-style
`y` concatenated to `x` on channels.

Also here: `remat_policy` (one function from names to policies), `build_model`, `init_params`,
`count_params` (shape-only) and converters between per-layer (`blocks_{i}`) and scanned (`blocks`) params.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention import RESIDUAL_NAMES
from pallas_kernels.mask import Mask
from rcm_jax.models.config import REMAT_POLICIES, WanConfig, get_config
from rcm_jax.models.layers import WanBlock, WanConditionEmbedder, at_least_f32, dense, layer_norm
from rcm_jax.models.rope import rope_tables
from rcm_jax.parallel.sharding import constrain

# The residual stream [B, L, D] under a mesh: batch over (data, fsdp), tokens over context (a no-op without one).
STREAM_AXES = ("batch", "tokens", None)

# Tensors tagged with `checkpoint_name` in the self-attention (see layers.WanAttention).
ATTENTION_NAMES = ("query", "key", "value", "attention_out")
# The flash kernel's own residuals (its output and logsumexp): a policy that saves them skips its recompute.
FLASH_RESIDUAL_NAMES = RESIDUAL_NAMES


def remat_policy(name: str):
  """Remat policy by name -> (use_remat, jax checkpoint policy).

  none: no remat (store everything). full: recompute the whole block in the backward pass (the flash
  attention's forward kernel included). dots_saveable: keep matmul outputs, recompute elementwise ops.
  attention_only: keep the self-attention's q, k, v and output and the flash kernel's logsumexp, so the backward
  pass never re-runs the quadratic attention; everything else is recomputed. attention_out_only: keep only the
  flash kernel's output and logsumexp (q, k, v are recomputed from the block input: linear cost), a quarter of
  attention_only's activations for most of its saving. With `attention_impl` other than "pallas" the flash names
  do not exist: attention_out_only is then `full`, and attention_only keeps q, k, v and the output.
  """
  if name == "none":
    return False, None
  if name == "full":
    return True, jax.checkpoint_policies.nothing_saveable
  if name == "dots_saveable":
    return True, jax.checkpoint_policies.dots_saveable
  if name == "attention_only":
    return True, jax.checkpoint_policies.save_only_these_names(*ATTENTION_NAMES, *FLASH_RESIDUAL_NAMES)
  if name == "attention_out_only":
    return True, jax.checkpoint_policies.save_only_these_names(*FLASH_RESIDUAL_NAMES)
  raise ValueError(f"unknown remat_policy {name!r}; use one of {REMAT_POLICIES}.")


def _scan_body(block, x, context, timestep_proj, cos, sin):
  return constrain(block(x, context, timestep_proj, cos, sin), STREAM_AXES), None


def _scan_body_cache(block, x, layer_cache, context, timestep_proj, cos, sin, cache_rope, write_at):
  return block(x, context, timestep_proj, cos, sin, layer_cache, cache_rope, write_at)


def _scan_body_cross_kv(block, carry, context):
  return carry, block(None, context, None, None, None)


def _scan_body_stacked(block, carry, layer, context, timestep_proj, cos, sin):
  """The in-place KV-cache path: every layer's cache stacks ride in the carry, read and written at `layer`."""
  x, k, v = carry
  x, (k, v) = block(x, context, timestep_proj, cos, sin, (k, v), None, None, layer)
  return (x, k, v), None


def _project_cross_kv(cfg: WanConfig, ctx):
  """Inside WanModel: every layer's cross-attention k/v of ctx [B, Lc, D] -> {"k", "v": [layers, B, Lc, H, Dh]}."""
  if ctx is None:
    return None
  if cfg.scan_layers:
    _, (k, v) = nn.scan(_scan_body_cross_kv, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast,), length=cfg.num_layers)(WanBlock(cfg, name="blocks"), None, ctx)
    return {"k": k, "v": v}
  kv = [WanBlock(cfg, name=f"blocks_{i}")(None, ctx, None, None, None) for i in range(cfg.num_layers)]
  return {"k": jnp.stack([k for k, _ in kv]), "v": jnp.stack([v for _, v in kv])}


def _check_inputs(cfg: WanConfig, x, t, context, labels, actions, y, mask, frame_positions, kv_cache=None,
                  cache_chunk_at=None, cache_positions=None, cross_kv=None):
  """Every shape check, before any compute. Returns t as [B, F] and frame_positions as an int[F] array."""
  if x.ndim != 5:
    raise ValueError(f"x must be [B, T, H, W, C], got shape {x.shape}.")
  b, num_t, height, width, channels = x.shape
  pt, ph, pw = cfg.patch_size
  for name, size, p in (("frames T", num_t, pt), ("height H", height, ph), ("width W", width, pw)):
    if size % p:
      raise ValueError(f"x {name} = {size} is not divisible by patch_size {cfg.patch_size} (config key "
                       "patch_size); resize the latents or change patch_size.")
  f, hp, wp = num_t // pt, height // ph, width // pw
  if channels + (0 if y is None else y.shape[-1]) != cfg.in_channels + cfg.cond_channels or (
      (y is None) != (cfg.cond_channels == 0)):
    raise ValueError(f"x has {channels} channels and y {None if y is None else y.shape[-1]}, but the config "
                     f"expects in_channels = {cfg.in_channels} and cond_channels = {cfg.cond_channels}; pass y "
                     "exactly when cond_channels > 0 (config keys in_channels, cond_channels).")
  if y is not None and y.shape[:4] != x.shape[:4]:
    raise ValueError(f"y must be [B, T, H, W, cond_channels] matching x {x.shape[:4]}, got {y.shape}.")
  t = jnp.asarray(t)
  if t.ndim == 1:
    t = jnp.broadcast_to(t[:, None], (t.shape[0], f))
  if t.shape != (b, f):
    raise ValueError(f"t must be [B, F] = {(b, f)} (one time per latent frame) or [B], got {t.shape}.")
  if context is not None and (context.ndim != 3 or context.shape[0] != b or context.shape[-1] != cfg.text_dim):
    raise ValueError(f"context must be [B, Lc, text_dim] = [{b}, Lc, {cfg.text_dim}], got {context.shape} "
                     "(config key text_dim).")
  if labels is not None:
    if cfg.num_classes <= 0:
      raise ValueError("labels were given but config num_classes = 0; set num_classes.")
    if labels.ndim != 2 or labels.shape[0] != b:
      raise ValueError(f"labels must be [B, K] ints, got {labels.shape}.")
  if actions is not None:
    if cfg.num_actions <= 0:
      raise ValueError("actions were given but config num_actions = 0; set num_actions.")
    if actions.shape != (b, f):
      raise ValueError(f"actions must be [B, F] = {(b, f)}, got {actions.shape}.")
  if frame_positions is None:
    frame_positions = np.arange(f)
  elif not hasattr(frame_positions, "shape"):
    frame_positions = np.asarray(frame_positions)
  if frame_positions.shape != (f,):
    raise ValueError(f"frame_positions must be [F] = [{f}], got {frame_positions.shape}.")
  num_tokens = f * hp * wp
  if kv_cache is not None:
    k = kv_cache["k"]
    want = (cfg.num_layers, b, k.shape[2], cfg.num_heads, cfg.head_dim)
    if k.shape != want or kv_cache["v"].shape != want:
      raise ValueError(f"kv_cache k/v must be [layers, B, S, H, Dh] = {want}, got {k.shape} / "
                       f"{kv_cache['v'].shape}.")
    if cache_chunk_at is not None:
      if cache_positions is not None or jnp.dtype(k.dtype) != jnp.dtype(cfg.compute_dtype):
        raise ValueError(f"cache_chunk_at (the chunk's k/v in the cache buffer) needs post-RoPE cached keys "
                         f"(cache_positions=None) in the compute dtype {jnp.dtype(cfg.compute_dtype).name}, got "
                         f"a {k.dtype} cache" + (" with cache_positions" if cache_positions is not None else "")
                         + ": pre-RoPE or other-dtype caches are rotated or cast into a copy anyway.")
      if isinstance(cache_chunk_at, (int, np.integer)) and not 0 <= cache_chunk_at <= k.shape[2] - num_tokens:
        raise ValueError(f"cache_chunk_at={cache_chunk_at}: the chunk's {num_tokens} rows must fit in the cache "
                         f"buffer of {k.shape[2]} tokens (rollout.init_cache(scratch_tokens=...)).")
      if mask is None or mask.shape != (num_tokens, k.shape[2]):
        raise ValueError(f"with cache_chunk_at, mask must be [L, S] = {(num_tokens, k.shape[2])} over the cache "
                         f"buffer (masks.chunk_vs_cache(key_len=S)), got {None if mask is None else mask.shape}.")
    elif mask is None or mask.shape != (num_tokens, k.shape[2] + num_tokens):
      raise ValueError(f"with a kv_cache, mask must be [L, S + L] = {(num_tokens, k.shape[2] + num_tokens)} over "
                       f"keys [cache | chunk] (masks.chunk_vs_cache), got {None if mask is None else mask.shape}.")
  elif mask is not None and mask.shape != (num_tokens, num_tokens):
    raise ValueError(f"mask shape {mask.shape} != (L, L) with L = F * H/ph * W/pw = {f} * {hp} * {wp} = "
                     f"{num_tokens}; build it with tokens_per_frame = {hp * wp} and num_frames = {f}.")
  if cross_kv is not None and (cross_kv["k"].shape[:2] != (cfg.num_layers, b)
                               or cross_kv["k"].shape != cross_kv["v"].shape):
    raise ValueError(f"cross_kv k/v {cross_kv['k'].shape} / {cross_kv['v'].shape}: expected [layers="
                     f"{cfg.num_layers}, batch={b}, Lc, heads, head_dim] from WanModel(return_cross_kv=True).")
  return t, frame_positions


class WanModel(nn.Module):
  """Wan2.1 DiT predicting the rectified-flow velocity `eps - x0`. See `__call__`."""
  config: WanConfig

  @nn.compact
  def __call__(self, x, t, *, context=None, labels=None, actions=None, y=None, mask: Mask | None = None,
               frame_positions=None, kv_cache=None, cache_positions=None, cache_write=None, cache_chunk_at=None,
               cross_kv=None, return_cross_kv=False):
    """Velocity [B, T, H, W, out_channels] in fp32 (float64 if x is float64).

    x: [B, T, H, W, in_channels] latents, channels-last.
    t: [B, F] time in [0, 1] per (post-patch) latent frame, F = T // patch_size[0] (= T for Wan), or [B]
       for one time per sample. The network receives 1000 * t.
    context: [B, Lc, text_dim] text embeddings. labels: [B, K] int class tokens (index num_classes = null),
       embedded as extra context tokens after `context`. Neither: the null class token if num_classes > 0,
       else the cross-attention sub-layers are skipped (their params exist all the same).
    actions: [B, F] int per-frame actions (index num_actions = null), added to the per-frame time embedding.
    y: [B, T, H, W, cond_channels] concatenated to x on channels before the patch embedding (i2v style).
    mask: static `pallas_kernels.Mask` [L, L] over the L = F * (H / ph) * (W / pw) tokens (frame-major).
    frame_positions: int[F] RoPE frame index per frame (default arange(F)); teacher forcing passes
       concat(arange(F / 2), arange(F / 2)).
    kv_cache: KV-cache path (`rcm_jax.inference.rollout`): {"k", "v": [layers, B, S, H, Dh]}; x is then one
       chunk, its queries attend to keys [cache | chunk] under `mask` [L, S + L], and the call returns
       (velocity, new kv_cache). cache_positions: int[S / tokens_per_frame] RoPE frame positions of the cache
       slots when keys are cached pre-RoPE (rotated at attention time), None when cached post-RoPE.
       cache_write: token slot (may be traced) where the chunk's k/v (same RoPE convention) are written, or None.
       cache_chunk_at: token offset of free rows in the cache buffer where the chunk's k/v are placed for the
       attention (post-RoPE keys in the compute dtype; `mask` is then [L, S] over the buffer). An int, or traced
       with a run-time `pallas_kernels.KeyIntervals` mask (`rollout.runtime_geometry`). Each
       layer writes and reads its entry of the stacked cache in place (the stacks are the layer loop's carry),
       where attending over a [cache | chunk] concatenation copies the layer's cache every call. None:
       concatenate (the differentiable path: training rollouts).
    return_cross_kv: return only every layer's cross-attention keys and values of the context tokens,
       {"k", "v": [layers, B, Lc, H, Dh]} (None when there are no context tokens); x and t set the batch.
    cross_kv: those stacks, given back for calls that share the context (the chunks of a stream): the text
       embedding and the per-layer k/v projections are then not recomputed; context and labels are ignored.
    """
    cfg = self.config
    dt = cfg.compute_dtype
    t, frame_positions = _check_inputs(cfg, x, t, context, labels, actions, y, mask, frame_positions, kv_cache,
                                       cache_chunk_at, cache_positions, cross_kv)
    b, num_t, height, width, _ = x.shape
    pt, ph, pw = cfg.patch_size
    f, hp, wp = num_t // pt, height // ph, width // pw
    num_tokens = f * hp * wp

    # --- patch embedding: Conv3d with kernel = stride = patch_size ---
    if y is not None:
      x = jnp.concatenate([x, y.astype(x.dtype)], axis=-1)
    h = nn.Conv(cfg.dim, kernel_size=cfg.patch_size, strides=cfg.patch_size, padding="VALID", dtype=dt,
                param_dtype=jnp.float32, name="patch_embedding")(x.astype(dt))
    h = constrain(at_least_f32(h.reshape(b, num_tokens, cfg.dim)), STREAM_AXES)   # residual stream [B, L, D]

    # --- time (+ action) embedding, per frame, fp32 ---
    cond = WanConditionEmbedder(cfg, name="condition_embedder")
    temb = cond.embed_time(1000.0 * at_least_f32(t))                     # [B, F, D]
    if cfg.num_actions > 0:
      # Zero-initialised: a pretrained Wan checkpoint is unchanged until the action embedding learns.
      embed = nn.Embed(cfg.num_actions + 1, cfg.dim, param_dtype=jnp.float32,
                       embedding_init=nn.initializers.zeros, name="action_embedder")
      if actions is None:
        actions = jnp.full((b, f), cfg.num_actions, jnp.int32)
      temb = temb + at_least_f32(embed(actions)).astype(temb.dtype)
    timestep_proj = cond.project_time(temb)                             # [B, F, 6, D]

    # --- context tokens: text, then class labels (or their cross-attention k/v, projected beforehand) ---
    if cross_kv is not None:   # layer i attends to (k[i], v[i]): scanned, or indexed by the layer loops
      ctx = (cross_kv["k"], cross_kv["v"])
    else:
      tokens = [] if context is None else [context.astype(dt)]
      if cfg.num_classes > 0:
        if labels is None and (context is None or self.is_initializing()):
          labels = jnp.full((b, 1), cfg.num_classes, jnp.int32)  # the null class: unconditional
        embed = nn.Embed(cfg.num_classes + 1, cfg.text_dim, param_dtype=jnp.float32,
                         embedding_init=nn.initializers.normal(1.0), name="label_embedder")
        if labels is not None:
          tokens.append(embed(labels).astype(dt))
      if not tokens and self.is_initializing():
        # Create the cross-attention params whatever the init inputs, so one config has one param tree.
        tokens.append(jnp.zeros((b, 1, cfg.text_dim), dt))
      ctx = cond.embed_text(jnp.concatenate(tokens, axis=1)) if tokens else None   # [B, Lc, D]
      if return_cross_kv:
        return _project_cross_kv(cfg, ctx)
    ctx_axis = nn.broadcast if cross_kv is None else 0
    layer_ctx = (lambda i: ctx) if cross_kv is None else (lambda i: (ctx[0][i], ctx[1][i]))

    # --- 3D RoPE tables at the frames' positions ---
    cos, sin = rope_tables(frame_positions, hp, wp, head_dim=cfg.head_dim, theta=cfg.rope_theta,
                           max_len=cfg.rope_max_seq_len)

    # --- transformer blocks ---
    use_remat, policy = remat_policy(cfg.remat_policy)
    block_cls = nn.remat(WanBlock, policy=policy, prevent_cse=not cfg.scan_layers) if use_remat else WanBlock
    if kv_cache is not None:
      cache_rope = None if cache_positions is None else rope_tables(
          cache_positions, hp, wp, head_dim=cfg.head_dim, theta=cfg.rope_theta, max_len=cfg.rope_max_seq_len)
      if cache_chunk_at is not None:   # in place: the stacks are carried through the layers, never sliced
        if cfg.scan_layers:
          blocks = block_cls(cfg, mask=mask, chunk_at=cache_chunk_at, name="blocks")
          (h, new_k, new_v), _ = nn.scan(
              _scan_body_stacked, variable_axes={"params": 0}, split_rngs={"params": True},
              in_axes=(0, ctx_axis) + (nn.broadcast,) * 3, length=cfg.num_layers)(
                  blocks, (h, kv_cache["k"], kv_cache["v"]), jnp.arange(cfg.num_layers, dtype=jnp.int32), ctx,
                  timestep_proj, cos, sin)
        else:
          new_k, new_v = kv_cache["k"], kv_cache["v"]
          for i in range(cfg.num_layers):
            h, (new_k, new_v) = block_cls(cfg, mask=mask, chunk_at=cache_chunk_at, name=f"blocks_{i}")(
                h, layer_ctx(i), timestep_proj, cos, sin, (new_k, new_v), None, None, jnp.int32(i))
        if cache_write is not None:   # every layer's chunk rows to their slot, after the last layer's read
          commit = lambda c: jax.lax.dynamic_update_slice_in_dim(
              c, jax.lax.dynamic_slice_in_dim(c, cache_chunk_at, num_tokens, axis=2), cache_write, axis=2)
          new_k, new_v = commit(new_k), commit(new_v)
      elif cfg.scan_layers:
        blocks = block_cls(cfg, mask=mask, name="blocks")
        h, (new_k, new_v) = nn.scan(
            _scan_body_cache, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(0, ctx_axis) + (nn.broadcast,) * 5, length=cfg.num_layers)(
                blocks, h, (kv_cache["k"], kv_cache["v"]), ctx, timestep_proj, cos, sin, cache_rope, cache_write)
      else:
        ks, vs = [], []
        for i in range(cfg.num_layers):
          h, (k_i, v_i) = block_cls(cfg, mask=mask, name=f"blocks_{i}")(
              h, layer_ctx(i), timestep_proj, cos, sin, (kv_cache["k"][i], kv_cache["v"][i]), cache_rope,
              cache_write)
          ks.append(k_i)
          vs.append(v_i)
        new_k, new_v = jnp.stack(ks), jnp.stack(vs)
    elif cfg.scan_layers:
      blocks = block_cls(cfg, mask=mask, name="blocks")
      h, _ = nn.scan(_scan_body, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(ctx_axis,) + (nn.broadcast,) * 3, length=cfg.num_layers)(blocks, h, ctx, timestep_proj,
                                                                                        cos, sin)
    else:
      for i in range(cfg.num_layers):
        h = constrain(block_cls(cfg, mask=mask, name=f"blocks_{i}")(h, layer_ctx(i), timestep_proj, cos, sin),
                      STREAM_AXES)

    # --- output head: LayerNorm, (shift, scale) = scale_shift_table + temb, linear, unpatchify; fp32 ---
    table = self.param("scale_shift_table", lambda k, s: jax.random.normal(k, s) / cfg.dim ** 0.5,
                       (1, 2, cfg.dim))
    mod = table[None] + at_least_f32(temb)[:, :, None, :]               # [B, F, 2, D]
    shift, scale = mod[:, :, 0, None], mod[:, :, 1, None]               # [B, F, 1, D]
    h = layer_norm(cfg.eps, False, "norm_out")(h).reshape(b, f, hp * wp, cfg.dim)
    h = (h * (1 + scale) + shift).reshape(b, num_tokens, cfg.dim)
    h = dense(cfg.out_channels * math.prod(cfg.patch_size), "proj_out", kernel_init=nn.initializers.zeros)(h)
    h = h.reshape(b, f, hp, wp, pt, ph, pw, cfg.out_channels)
    h = h.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, num_t, height, width, cfg.out_channels)
    if kv_cache is not None:
      return at_least_f32(h), {"k": new_k, "v": new_v}
    return at_least_f32(h)


def build_model(size_or_config: "str | WanConfig" = "tiny", **overrides) -> WanModel:
  """WanModel from a size name in `config.SIZES` (or a WanConfig) plus field overrides."""
  return WanModel(get_config(size_or_config, **overrides))


def dummy_inputs(config: WanConfig, batch: int = 1, frames: int = 1) -> tuple[tuple, dict]:
  """Smallest (args, kwargs) that create every parameter (param shapes do not depend on input sizes)."""
  pt, ph, pw = config.patch_size
  x = jnp.zeros((batch, frames * pt, ph, pw, config.in_channels), jnp.float32)
  kwargs = {"context": jnp.zeros((batch, 1, config.text_dim), jnp.float32)}
  if config.cond_channels:
    kwargs["y"] = jnp.zeros((batch, frames * pt, ph, pw, config.cond_channels), jnp.float32)
  return (x, jnp.zeros((batch, frames), jnp.float32)), kwargs


def init_params(config: "str | WanConfig", rng):
  """Freshly initialised fp32 params of the model for `config` (a size name or WanConfig)."""
  config = get_config(config)
  args, kwargs = dummy_inputs(config)
  return WanModel(config).init(rng, *args, **kwargs)["params"]


def count_params(config: "str | WanConfig") -> int:
  """Number of parameters, from shapes only (`jax.eval_shape`, nothing allocated)."""
  config = get_config(config)
  args, kwargs = dummy_inputs(config)
  shapes = jax.eval_shape(lambda: WanModel(config).init(jax.random.key(0), *args, **kwargs)["params"])
  return int(sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes)))


def loop_to_scan_params(params, num_layers: int):
  """Per-layer params (`blocks_0` ... `blocks_{n-1}`) -> scanned params (`blocks`, leading layer axis)."""
  params = dict(params)
  layers = [params.pop(f"blocks_{i}") for i in range(num_layers)]
  params["blocks"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
  return params


def scan_to_loop_params(params, num_layers: int):
  """Scanned params (`blocks`, leading layer axis) -> per-layer params (`blocks_{i}`)."""
  params = dict(params)
  stacked = params.pop("blocks")
  for i in range(num_layers):
    params[f"blocks_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
  return params
