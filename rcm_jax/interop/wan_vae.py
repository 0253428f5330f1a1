"""The Wan2.1 causal 3D VAE in Flax linen (encode / decode with Wan's temporal causal caching), and its loader.

Owns: `WanVAEConfig` (sizes; `WAN2P1` = the real Wan2.1 VAE, `TINY` for tests), the linen modules, the
streaming (chunked, cached) and whole-clip forward passes, Wan's latent normalisation, and reading a diffusers
`AutoencoderKLWan` folder (config.json + safetensors, no torch). Parity with diffusers 0.42.1 is tested in
tests/test_interop_vae.py.

API (all arrays channels-last; jit with `config` static, it is a frozen hashable dataclass):

    config, params = load_vae(folder)                    # diffusers AutoencoderKLWan folder (or its `vae/`)
    latents = encode(params, video, config=config)       # video [B, T, H, W, 3] in [-1, 1], T = 1 + 4k
                                                         #   -> [B, 1 + k, H/8, W/8, z_dim], normalised
    video = decode(params, latents, config=config)       # normalised latents [B, F, h, w, z_dim]
                                                         #   -> [B, 1 + 4(F-1), 8h, 8w, 3], clipped to [-1, 1]
    mean, logvar = encode_moments(params, video, config=config)   # the raw posterior (un-normalised)

`encode` returns the posterior mean (Wan encodes with the mean, never a sample), normalised per channel as
Wan does: `(mean - latents_mean) / latents_std`. `decode` un-normalises (`z * latents_std + latents_mean`),
decodes and clips to [-1, 1] like diffusers. `encode_jit` / `decode_jit` are the same under jax.jit.
`init_params(seed, config)` gives random params (tiny models); `to_diffusers_state_dict(params)` is the inverse
of the loader's key mapping; `diffusers_shapes(config)` lists the keys and shapes a folder must hold.

Temporal causality. Every 3x3x3 conv is causal in time: it sees the current frame and the two before it
(zeros before the first frame). The first frame is special: the temporal down-samplers pass it through and
then take stride-2 windows over the whole stream (so T = 1 + 4k frames -> 1 + k latents), and the temporal
up-samplers pass the first latent frame through and turn every later frame into two. diffusers runs this
chunk by chunk (first frame alone, then 4 frames per chunk when encoding; one latent frame per chunk when
decoding), carrying each causal conv's last two input frames in a feature cache. Here each layer is a
function `(x, cache) -> (y, cache)` where `cache=None` means "start of the stream"; so
- `chunked=True` (default) is the same computation as diffusers: first chunk with `cache=None`, then a
  `lax.scan` over the remaining equal chunks with a fixed-shape cache (memory of one chunk: what real
  480p/720p clips need);
- `chunked=False` is one call over the whole clip with `cache=None`: the equivalent whole-clip causal
  computation (faster on small clips, memory of the whole clip).
Both agree with diffusers within float32 rounding (tests). Only Wan2.1's layout is supported: a Wan2.2 VAE
(`is_residual`, `patch_size`) is refused by the loader.

Numerics and cost (measured on one H100, jax 0.11.2, random real-size weights): decoding 21 latent frames of
60x104 to 81 frames of 480x832 (chunked) takes 0.99 s with `dtype="bfloat16"` (3.7 GiB temporaries) and 1.64 s
in float32 (7.3 GiB), after a 15-18 s compile. On GPU, float32 convs use TF32 at jax's default precision: on
the parity model that left errors of 4e-4 (encode) and 3e-3 (decode) against diffusers' CPU output, and
`with jax.default_matmul_precision("highest")` brought them back to 7e-7 / 4e-6. bfloat16 compute: about
7e-3 (encode) and 6e-2 (decode, max over pixels).

Parameter names mirror diffusers' keys by one rule: numeric segments join the name before them and convs'
`weight` becomes a transposed `kernel`, e.g. `decoder.up_blocks.0.upsamplers.0.time_conv.weight` [O, I, 3, 1, 1]
-> `decoder/up_blocks_0/upsamplers_0/time_conv/kernel` [3, 1, 1, I, O]; RMS norms keep `gamma` as [C].
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rcm_jax.errors import UserError

# Wan2.1's per-channel latent statistics (diffusers' AutoencoderKLWan defaults, from the Wan2.1 repo).
WAN2P1_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                       0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN2P1_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                      3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
DTYPES = ("float32", "bfloat16", "float16")
CACHE_T = 2  # frames of history a temporal-kernel-3 causal conv needs
DIFFUSERS_CLASS = "AutoencoderKLWan"


class VAECheckpointError(UserError):
  """A VAE folder that cannot be loaded: missing / unknown keys, wrong shapes, unsupported variants."""


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
  """Wan2.1 VAE sizes (names as diffusers' `AutoencoderKLWan` config). Frozen and hashable (a jit static)."""
  base_dim: int = 96                                      # channels of the first encoder stage
  decoder_base_dim: int | None = None                     # channels of the last decoder stage (None: base_dim)
  z_dim: int = 16                                         # latent channels
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)                # channel multiplier per stage
  num_res_blocks: int = 2                                 # residual blocks per encoder stage (decoder: +1)
  attn_scales: tuple[float, ...] = ()                     # must be empty (diffusers' key; Wan2.1 has none)
  temperal_downsample: tuple[bool, ...] = (False, True, True)  # per down-sampling stage: also halve time?
  latents_mean: tuple[float, ...] = WAN2P1_LATENTS_MEAN   # per-channel latent mean (normalisation)
  latents_std: tuple[float, ...] = WAN2P1_LATENTS_STD     # per-channel latent std (normalisation)
  in_channels: int = 3                                    # video channels in
  out_channels: int = 3                                   # video channels out
  dtype: str = "float32"                                  # compute dtype of convs / attention; params stay fp32

  def __post_init__(self):
    def bad(key, msg):
      raise UserError(f"WanVAEConfig.{key}: {msg}")

    for key in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
      v = getattr(self, key)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        bad(key, f"must be a positive int, got {v!r}.")
    if self.decoder_base_dim is not None and (not isinstance(self.decoder_base_dim, int) or self.decoder_base_dim < 1):
      bad("decoder_base_dim", f"must be None or a positive int, got {self.decoder_base_dim!r}.")
    for key in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
      if not isinstance(getattr(self, key), tuple):
        bad(key, f"must be a tuple (hashable), got {type(getattr(self, key)).__name__}.")
    if len(self.dim_mult) < 2:
      bad("dim_mult", f"needs at least 2 stages, got {self.dim_mult}.")
    used = self.temperal_downsample[:len(self.dim_mult) - 1]
    if len(used) != len(self.dim_mult) - 1 or sum(map(bool, used)) != 2:
      bad("temperal_downsample", f"{self.temperal_downsample}: its first len(dim_mult) - 1 = "
          f"{len(self.dim_mult) - 1} entries must hold exactly two True (Wan's 4x temporal compression, which "
          "diffusers' 1 + 4k frame chunking assumes).")
    if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
      bad("latents_mean", f"latents_mean and latents_std need z_dim = {self.z_dim} entries each, got "
          f"{len(self.latents_mean)} and {len(self.latents_std)}.")
    if any(s <= 0 for s in self.latents_std):
      bad("latents_std", f"must be positive, got {self.latents_std}.")
    if self.attn_scales:
      bad("attn_scales", f"{self.attn_scales}: must be empty. Wan2.1 has no attention in the encoder stages, and "
          "diffusers' AutoencoderKLWan (0.42.1) cannot run with it either, so there is nothing to match.")
    if self.dtype not in DTYPES:
      bad("dtype", f"{self.dtype!r} is not one of {DTYPES}.")

  @property
  def temporal_factor(self) -> int:
    return 4

  @property
  def spatial_factor(self) -> int:
    return 2 ** (len(self.dim_mult) - 1)

  @property
  def temperal_upsample(self) -> tuple[bool, ...]:
    return tuple(self.temperal_downsample[::-1])

  def latent_shape(self, video_shape):
    """[B, T, H, W, C] video -> [B, 1 + (T-1)/4, H/8, W/8, z_dim] latents (sizes for the real VAE)."""
    b, t, h, w, _ = video_shape
    s = self.spatial_factor
    return (b, 1 + (t - 1) // self.temporal_factor, h // s, w // s, self.z_dim)

  def video_shape(self, latent_shape):
    b, f, h, w, _ = latent_shape
    s = self.spatial_factor
    return (b, 1 + self.temporal_factor * (f - 1), h * s, w * s, self.out_channels)


WAN2P1 = WanVAEConfig()
# A 0.6M-parameter VAE with the real one's structure (4 stages, 2 temporal down-samplings; 8x spatial, 4x time).
TINY = WanVAEConfig(base_dim=8, z_dim=4, num_res_blocks=1, latents_mean=(0.1, -0.2, 0.3, 0.0),
                    latents_std=(1.5, 0.8, 2.0, 1.0))

# diffusers config keys -> ours (those that exist in both). Keys diffusers records but Wan2.1 never changes.
_CONFIG_KEYS = ("base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales",
                "temperal_downsample", "latents_mean", "latents_std", "in_channels", "out_channels")
_IGNORED_CONFIG_KEYS = ("dropout", "scale_factor_temporal", "scale_factor_spatial")


def config_from_diffusers(d: dict, dtype: str = "float32") -> WanVAEConfig:
  """A diffusers `AutoencoderKLWan` config.json (dict) -> WanVAEConfig. Wan2.2 variants are refused."""
  cls = d.get("_class_name", DIFFUSERS_CLASS)
  if cls != DIFFUSERS_CLASS:
    raise VAECheckpointError(f"config.json has _class_name {cls!r}; a Wan2.1 VAE folder has {DIFFUSERS_CLASS!r}.")
  if d.get("is_residual", False) or d.get("patch_size") is not None:
    raise VAECheckpointError(
        f"config.json has is_residual={d.get('is_residual')} / patch_size={d.get('patch_size')}: that is the Wan2.2 "
        "VAE, which rcm-jax does not implement; use the Wan2.1 VAE (is_residual false, patch_size null).")
  unknown = sorted(k for k in d if not k.startswith("_") and k not in _CONFIG_KEYS + _IGNORED_CONFIG_KEYS
                   + ("is_residual", "patch_size"))
  if unknown:
    raise VAECheckpointError(f"config.json has keys rcm-jax's Wan2.1 VAE does not know: {unknown}.")
  kw = {}
  for k in _CONFIG_KEYS:
    if k in d:
      v = d[k]
      kw[k] = tuple(v) if isinstance(v, list) else v
  for k in ("latents_mean", "latents_std", "attn_scales"):
    if k in kw:
      kw[k] = tuple(float(x) for x in kw[k])
  if "temperal_downsample" in kw:
    kw["temperal_downsample"] = tuple(bool(x) for x in kw["temperal_downsample"])
  if "z_dim" in kw and kw["z_dim"] != 16:  # diffusers' 16-entry defaults only fit z_dim = 16
    for k in ("latents_mean", "latents_std"):
      if k not in kw:
        raise VAECheckpointError(f"config.json sets z_dim={kw['z_dim']} but no {k}; it needs z_dim entries.")
  return WanVAEConfig(dtype=dtype, **kw)


# ----------------------------------------------------------------------------- layers

def _uniform(bound: float):
  """PyTorch's default conv init (kaiming-uniform, a = sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Conv(nn.Module):
  """A plain 2D or 3D conv on channels-last frames; 3D is VALID in time (causal padding is the caller's).

  x: [B, T, H, W, Cin] -> [B, T', H', W', Cout]. 2D kernels run frame by frame. `pad_hw`: ((top, bottom),
  (left, right)) zero padding. Params: kernel [(kt,) kh, kw, Cin, Cout] and bias [Cout], fp32.
  """
  features: int
  kernel_size: tuple[int, ...]
  stride: tuple[int, ...] = None
  pad_hw: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    nd = len(self.kernel_size)
    cin = x.shape[-1]
    kshape = (*self.kernel_size, cin, self.features)
    bound = 1.0 / math.sqrt(cin * math.prod(self.kernel_size))
    kernel = self.param("kernel", _uniform(bound), kshape)
    bias = self.param("bias", _uniform(bound), (self.features,))
    dt = jnp.dtype(self.dtype)
    stride = self.stride or (1,) * nd
    b, t = x.shape[:2]
    if nd == 2:
      x = x.reshape(b * t, *x.shape[2:])
      dims = ("NHWC", "HWIO", "NHWC")
      pad = self.pad_hw
    else:
      dims = ("NDHWC", "DHWIO", "NDHWC")
      pad = ((0, 0), *self.pad_hw)
    y = lax.conv_general_dilated(x.astype(dt), kernel.astype(dt), stride, pad, dimension_numbers=dims,
                                 preferred_element_type=dt)
    y = y + bias.astype(dt)
    if nd == 2:
      y = y.reshape(b, t, *y.shape[1:])
    return y


def causal_conv3d(conv: Conv, x, cache, pad: int = CACHE_T):
  """conv over a stream whose history before its first frame is zeros (Wan's causal padding of 2 frames).

  x: [B, T, H, W, C] this chunk; cache: the stream's last `pad` input frames so far, None at the stream start.
  Returns (y [B, T, ...], new cache [B, pad, H, W, C]).
  """
  history = jnp.zeros((x.shape[0], pad, *x.shape[2:]), x.dtype) if cache is None else cache
  xx = jnp.concatenate([history, x], axis=1)
  return conv(xx), xx[:, -pad:]


class RMSNorm(nn.Module):
  """diffusers' WanRMS_norm: x / max(||x||_2 over channels, 1e-12) * sqrt(C) * gamma, computed in fp32."""

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    gamma = self.param("gamma", nn.initializers.ones, (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
    return (xf / jnp.maximum(norm, 1e-12) * (c ** 0.5) * gamma).astype(x.dtype)


class ResidualBlock(nn.Module):
  """RMS -> SiLU -> causal conv3x3x3 -> RMS -> SiLU -> causal conv3x3x3, plus a (1x1x1 conv) shortcut."""
  out_dim: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, cache):
    cache = cache or {}
    if x.shape[-1] != self.out_dim:
      h = Conv(self.out_dim, (1, 1, 1), dtype=self.dtype, name="conv_shortcut")(x)
    else:
      h = x
    x = nn.silu(RMSNorm(name="norm1")(x))
    x, c1 = causal_conv3d(Conv(self.out_dim, (3, 3, 3), pad_hw=((1, 1), (1, 1)), dtype=self.dtype, name="conv1"),
                          x, cache.get("conv1"))
    x = nn.silu(RMSNorm(name="norm2")(x))
    x, c2 = causal_conv3d(Conv(self.out_dim, (3, 3, 3), pad_hw=((1, 1), (1, 1)), dtype=self.dtype, name="conv2"),
                          x, cache.get("conv2"))
    return x + h, {"conv1": c1, "conv2": c2}


class AttentionBlock(nn.Module):
  """Single-head self-attention over the H*W positions of each frame separately (no temporal mixing)."""
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, cache):
    b, t, hh, ww, c = x.shape
    y = RMSNorm(name="norm")(x)
    qkv = Conv(3 * c, (1, 1), dtype=self.dtype, name="to_qkv")(y)          # [B, T, H, W, 3C]
    qkv = qkv.reshape(b * t, hh * ww, 3 * c)
    q, k, v = jnp.split(qkv, 3, axis=-1)                                  # [BT, HW, C] each
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    y = jnp.einsum("bqk,bkc->bqc", probs, v).reshape(b, t, hh, ww, c)
    y = Conv(c, (1, 1), dtype=self.dtype, name="proj")(y)
    return y + x, None


def _upsample_nearest2x(x):
  """[..., H, W, C] -> [..., 2H, 2W, C], every pixel repeated (torch 'nearest-exact' at scale 2)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)


class Resample(nn.Module):
  """Wan's up/down-samplers. mode: 'upsample2d' | 'upsample3d' | 'downsample2d' | 'downsample3d'.

  Spatial part per frame: down = zero-pad bottom/right by 1 then a stride-2 3x3 conv; up = nearest 2x then a
  3x3 conv to out_dim (Wan2.1: dim // 2). Temporal part (`time_conv`, kernel 3 in time):
  - downsample3d (after the spatial part): at the stream start y = [x_0, stride-2 VALID windows over x], later
    chunks prepend the previous chunk's last frame; cache = last input frame.
  - upsample3d (before the spatial part): x_0 passes through; every later frame goes through a causal conv to
    2C channels, split into two frames (first C channels, then the next C); cache = last 2 causal inputs.
  """
  mode: str
  out_dim: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, cache):
    c = x.shape[-1]
    new_cache = None
    if self.mode == "upsample3d":
      tconv = Conv(2 * c, (3, 1, 1), dtype=self.dtype, name="time_conv")
      head, rest = (x[:, :1], x[:, 1:]) if cache is None else (None, x)
      if rest.shape[1]:
        y, new_cache = causal_conv3d(tconv, rest, cache)                  # [B, T', H, W, 2C]
        b, tt = y.shape[:2]
        y = y.reshape(b, tt, *y.shape[2:4], 2, c)                         # channel halves = frames 2t, 2t+1
        y = jnp.moveaxis(y, 4, 2).reshape(b, 2 * tt, *y.shape[2:4], c)
        x = y if head is None else jnp.concatenate([head, y], axis=1)
      else:                                                                # one frame at the stream start
        new_cache = jnp.zeros((x.shape[0], CACHE_T, *x.shape[2:]), x.dtype)
        if self.is_initializing():
          tconv(jnp.zeros((x.shape[0], 3, 1, 1, c), x.dtype))
    if self.mode in ("upsample2d", "upsample3d"):
      conv = Conv(self.out_dim, (3, 3), pad_hw=((1, 1), (1, 1)), dtype=self.dtype, name="resample_1")
      return conv(_upsample_nearest2x(x)), new_cache
    if self.mode not in ("downsample2d", "downsample3d"):
      raise ValueError(f"unknown Resample mode {self.mode!r}")
    x = Conv(c, (3, 3), stride=(2, 2), pad_hw=((0, 1), (0, 1)), dtype=self.dtype, name="resample_1")(x)
    if self.mode == "downsample2d":
      return x, None
    tconv = Conv(c, (3, 1, 1), stride=(2, 1, 1), dtype=self.dtype, name="time_conv")
    new_cache = x[:, -1:]
    if cache is not None:
      return tconv(jnp.concatenate([cache, x], axis=1)), new_cache
    if x.shape[1] >= 3:
      return jnp.concatenate([x[:, :1], tconv(x)], axis=1), new_cache
    if self.is_initializing():
      tconv(jnp.zeros((x.shape[0], 3, *x.shape[2:]), x.dtype))
    return x, new_cache


def _encoder_layout(cfg: WanVAEConfig):
  """The encoder's flat `down_blocks` list: ('res', out_dim) | ('down2d' | 'down3d', dim)."""
  dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
  layers = []
  for i, dout in enumerate(dims[1:]):
    layers.extend([("res", dout)] * cfg.num_res_blocks)
    if i != len(cfg.dim_mult) - 1:
      layers.append(("down3d" if cfg.temperal_downsample[i] else "down2d", dout))
  return dims, layers


def _decoder_layout(cfg: WanVAEConfig):
  """Per up block: (out_dim, number of residual blocks, upsample mode or None); plus dims[0]."""
  base = cfg.decoder_base_dim or cfg.base_dim
  dims = [base * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
  blocks = []
  for i, dout in enumerate(dims[1:]):
    mode = None
    if i != len(cfg.dim_mult) - 1:
      mode = "upsample3d" if cfg.temperal_upsample[i] else "upsample2d"
    blocks.append((dout, cfg.num_res_blocks + 1, mode))
  return dims, blocks


class MidBlock(nn.Module):
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, cache):
    cache = cache or {}
    c = x.shape[-1]
    x, c0 = ResidualBlock(c, self.dtype, name="resnets_0")(x, cache.get("resnets_0"))
    x, _ = AttentionBlock(self.dtype, name="attentions_0")(x, None)
    x, c1 = ResidualBlock(c, self.dtype, name="resnets_1")(x, cache.get("resnets_1"))
    return x, {"resnets_0": c0, "resnets_1": c1}


class Encoder(nn.Module):
  """video chunk [B, T, H, W, 3] -> [B, T', H/8, W/8, 2 z_dim] (before quant_conv)."""
  config: WanVAEConfig

  @nn.compact
  def __call__(self, x, cache):
    cfg, dt = self.config, self.config.dtype
    cache = cache or {}
    new = {}
    dims, layers = _encoder_layout(cfg)
    x, new["conv_in"] = causal_conv3d(Conv(dims[0], (3, 3, 3), pad_hw=((1, 1), (1, 1)), dtype=dt, name="conv_in"),
                                      x, cache.get("conv_in"))
    for i, (kind, d) in enumerate(layers):
      name = f"down_blocks_{i}"
      if kind == "res":
        layer = ResidualBlock(d, dt, name=name)
      else:
        layer = Resample("downsample3d" if kind == "down3d" else "downsample2d", d, dt, name=name)
      x, new[name] = layer(x, cache.get(name))
    x, new["mid_block"] = MidBlock(dt, name="mid_block")(x, cache.get("mid_block"))
    x = nn.silu(RMSNorm(name="norm_out")(x))
    x, new["conv_out"] = causal_conv3d(
        Conv(2 * cfg.z_dim, (3, 3, 3), pad_hw=((1, 1), (1, 1)), dtype=dt, name="conv_out"), x, cache.get("conv_out"))
    return x, new


class UpBlock(nn.Module):
  out_dim: int
  num_res: int
  mode: str | None
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, cache):
    cache = cache or {}
    new = {}
    for j in range(self.num_res):
      x, new[f"resnets_{j}"] = ResidualBlock(self.out_dim, self.dtype, name=f"resnets_{j}")(x, cache.get(f"resnets_{j}"))
    if self.mode is not None:
      x, new["upsamplers_0"] = Resample(self.mode, self.out_dim // 2, self.dtype, name="upsamplers_0")(
          x, cache.get("upsamplers_0"))
    return x, new


class Decoder(nn.Module):
  """latent chunk [B, F, h, w, z_dim] (after post_quant_conv) -> video [B, T', 8h, 8w, 3] (not clipped)."""
  config: WanVAEConfig

  @nn.compact
  def __call__(self, x, cache):
    cfg, dt = self.config, self.config.dtype
    cache = cache or {}
    new = {}
    dims, blocks = _decoder_layout(cfg)
    x, new["conv_in"] = causal_conv3d(Conv(dims[0], (3, 3, 3), pad_hw=((1, 1), (1, 1)), dtype=dt, name="conv_in"),
                                      x, cache.get("conv_in"))
    x, new["mid_block"] = MidBlock(dt, name="mid_block")(x, cache.get("mid_block"))
    for i, (dout, nres, mode) in enumerate(blocks):
      name = f"up_blocks_{i}"
      x, new[name] = UpBlock(dout, nres, mode, dt, name=name)(x, cache.get(name))
    x = nn.silu(RMSNorm(name="norm_out")(x))
    x, new["conv_out"] = causal_conv3d(
        Conv(cfg.out_channels, (3, 3, 3), pad_hw=((1, 1), (1, 1)), dtype=dt, name="conv_out"), x, cache.get("conv_out"))
    return x, new


class WanVAE(nn.Module):
  """Params: encoder, quant_conv (1x1x1, 2z -> 2z), post_quant_conv (1x1x1, z -> z), decoder."""
  config: WanVAEConfig

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    self.quant_conv = Conv(2 * cfg.z_dim, (1, 1, 1), dtype=cfg.dtype)
    self.post_quant_conv = Conv(cfg.z_dim, (1, 1, 1), dtype=cfg.dtype)

  def encode_stream(self, x, cache):
    """One chunk of video -> (moments chunk [B, T', h, w, 2 z_dim] (mean | logvar), cache)."""
    h, cache = self.encoder(x, cache)
    return self.quant_conv(h), cache

  def decode_stream(self, z, cache):
    """One chunk of raw latents -> (video chunk, unclipped, cache)."""
    return self.decoder(self.post_quant_conv(z), cache)

  def __call__(self, x, z):
    """Init only: runs both streams from their start on a short clip so every parameter is created."""
    return self.encode_stream(x, None)[0], self.decode_stream(z, None)[0]


# ----------------------------------------------------------------------------- public functions

def _init_inputs(cfg: WanVAEConfig):
  s = cfg.spatial_factor
  x = jnp.zeros((1, 1 + cfg.temporal_factor, s, s, cfg.in_channels), jnp.float32)
  z = jnp.zeros((1, 2, 1, 1, cfg.z_dim), jnp.float32)
  return x, z


def init_params(seed: int, config: WanVAEConfig):
  """Random params as a nested dict: PyTorch's default conv init (kernel and bias U(+-1/sqrt(fan_in))), unit
  RMS gammas. Drawn with numpy from `param_shapes` (a jitted linen init compiles one threefry per parameter:
  minutes on CPU even for the tiny VAE)."""
  rng = np.random.default_rng(seed)

  def draw(node):
    if "gamma" in node:
      return {"gamma": jnp.ones(node["gamma"].shape, jnp.float32)}
    if "kernel" in node:
      bound = 1.0 / math.sqrt(math.prod(node["kernel"].shape[:-1]))
      return {k: jnp.asarray(rng.uniform(-bound, bound, v.shape), jnp.float32) for k, v in node.items()}
    return {k: draw(v) for k, v in node.items()}

  return draw(param_shapes(config))


def param_shapes(config: WanVAEConfig):
  """The param tree as jax.ShapeDtypeStruct leaves (no compute)."""
  x, z = _init_inputs(config)
  return jax.eval_shape(lambda: WanVAE(config).init(jax.random.PRNGKey(0), x, z)["params"])


def _check_video(video, cfg: WanVAEConfig, name="video"):
  if video.ndim != 5 or video.shape[-1] != cfg.in_channels:
    raise UserError(f"{name} must be [B, T, H, W, {cfg.in_channels}] (channels last), got shape {video.shape}.")
  t, h, w = video.shape[1:4]
  if (t - 1) % cfg.temporal_factor:
    raise UserError(f"{name} has T = {t} frames; the Wan VAE encodes T = 1 + 4k frames (e.g. 1, 5, 9, ..., 81). "
                    "Trim or pad the clip.")
  s = cfg.spatial_factor
  if h % s or w % s:
    raise UserError(f"{name} is {h}x{w}; height and width must be multiples of {s} for the Wan VAE.")


def _scan_chunks(step, cache, x, chunk: int):
  """Run `step(x_chunk, cache) -> (y_chunk, cache)` over x in chunks of `chunk` frames (a lax.scan) -> (y, the
  cache after the last chunk)."""
  b, t = x.shape[:2]
  n = t // chunk
  xs = jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)              # [n, B, chunk, ...]

  def body(c, xc):
    y, c = step(xc, c)
    return c, y

  cache, ys = lax.scan(body, cache, xs)                                      # [n, B, t', ...]
  ys = jnp.moveaxis(ys, 0, 1)
  return ys.reshape(b, n * ys.shape[2], *ys.shape[3:]), cache


def encode_moments(params, video, *, config: WanVAEConfig, chunked: bool = True):
  """Posterior of `video` [B, T, H, W, 3] in [-1, 1] -> (mean, logvar), each [B, 1 + (T-1)/4, H/8, W/8, z_dim].

  Raw (un-normalised) like diffusers' `latent_dist.mean` / `.logvar` (logvar clipped to [-30, 20]).
  chunked: the first frame then 4-frame chunks through a scan with the causal cache (diffusers' schedule, memory
  of one chunk); False: the whole clip at once (same result).
  """
  video = jnp.asarray(video)
  _check_video(video, config)
  model = WanVAE(config)

  def step(x, cache):
    return model.apply({"params": params}, x, cache, method=WanVAE.encode_stream)

  if chunked:
    h, cache = step(video[:, :1], None)
    if video.shape[1] > 1:
      h = jnp.concatenate([h, _scan_chunks(step, cache, video[:, 1:], config.temporal_factor)[0]], axis=1)
  else:
    h, _ = step(video, None)
  h = h.astype(jnp.float32)
  mean, logvar = jnp.split(h, 2, axis=-1)
  return mean, jnp.clip(logvar, -30.0, 20.0)


def _stats(config: WanVAEConfig):
  return (jnp.asarray(config.latents_mean, jnp.float32), jnp.asarray(config.latents_std, jnp.float32))


def normalize_latents(z, *, config: WanVAEConfig):
  """Raw VAE latents -> the DiT's latents: (z - latents_mean) / latents_std per channel (last axis)."""
  mean, std = _stats(config)
  return (z - mean) / std


def denormalize_latents(z, *, config: WanVAEConfig):
  """The DiT's latents -> raw VAE latents: z * latents_std + latents_mean per channel (last axis)."""
  mean, std = _stats(config)
  return z * std + mean


def encode(params, video, *, config: WanVAEConfig, chunked: bool = True):
  """video [B, T, H, W, 3] in [-1, 1], T = 1 + 4k -> normalised posterior mean [B, 1 + k, H/8, W/8, z_dim]."""
  mean, _ = encode_moments(params, video, config=config, chunked=chunked)
  return normalize_latents(mean, config=config)


def decode(params, latents, *, config: WanVAEConfig, chunked: bool = True):
  """Normalised latents [B, F, h, w, z_dim] -> video [B, 1 + 4(F-1), 8h, 8w, 3] in [-1, 1] (fp32, clipped).

  chunked: one latent frame per scan step with the causal cache (diffusers' schedule, memory of 4 frames);
  False: the whole clip at once (same result).
  """
  if chunked:
    return decode_chunk(params, latents, None, config=config)[0]
  z = _check_latents(latents, config)
  out, _ = WanVAE(config).apply({"params": params}, z, None, method=WanVAE.decode_stream)
  return jnp.clip(out.astype(jnp.float32), -1.0, 1.0)


def decode_chunk(params, latents, cache=None, *, config: WanVAEConfig):
  """Streaming decode, one generated chunk at a time: normalised latents [B, n, h, w, z_dim] of the next chunk
  and the cache the previous call returned (None for the stream's first chunk) -> (its frames in [-1, 1], fp32:
  1 + 4(n - 1) for the first chunk, 4n after; the cache). Chunk after chunk gives `decode`'s frames: both run
  one latent frame per step with the causal cache."""
  z = _check_latents(latents, config)
  model = WanVAE(config)

  def step(x, c):
    return model.apply({"params": params}, x, c, method=WanVAE.decode_stream)

  outs = []
  if cache is None:
    out, cache = step(z[:, :1], None)
    outs, z = [out], z[:, 1:]
  if z.shape[1]:
    out, cache = _scan_chunks(step, cache, z, 1)
    outs.append(out)
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
  return jnp.clip(out.astype(jnp.float32), -1.0, 1.0), cache


def _check_latents(latents, config: WanVAEConfig):
  """Normalised latents [B, F, h, w, z_dim] -> raw fp32 latents, or a UserError naming the shape."""
  latents = jnp.asarray(latents)
  if latents.ndim != 5 or latents.shape[-1] != config.z_dim:
    raise UserError(f"latents must be [B, F, h, w, {config.z_dim}] (channels last), got shape {latents.shape}.")
  return denormalize_latents(latents.astype(jnp.float32), config=config)


# ----------------------------------------------------------------------------- diffusers checkpoints

def _flax_path(key: str) -> tuple[str, ...]:
  """'decoder.up_blocks.0.resnets.1.conv1.weight' -> ('decoder', 'up_blocks_0', 'resnets_1', 'conv1', 'kernel')."""
  out = []
  for part in key.split("."):
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  if out[-1] == "weight":
    out[-1] = "kernel"
  return tuple(out)


def _torch_key(path: tuple[str, ...]) -> str:
  """Inverse of `_flax_path`."""
  parts = []
  for p in path[:-1]:
    head, _, tail = p.rpartition("_")
    parts.extend([head, tail] if tail.isdigit() and head else [p])
  parts.append("weight" if path[-1] == "kernel" else path[-1])
  return ".".join(parts)


def _from_torch(path, value: np.ndarray) -> np.ndarray:
  """A torch tensor's layout -> ours: conv weights [O, I, *k] -> [*k, I, O]; gammas [C, 1, ...] -> [C]."""
  if path[-1] == "kernel":
    return np.transpose(value, (*range(2, value.ndim), 1, 0))
  if path[-1] == "gamma":
    return value.reshape(value.shape[0])
  return value


def _torch_shape(path, shape) -> tuple[int, ...]:
  """Our leaf shape -> diffusers' shape: kernels [*k, I, O] -> [O, I, *k]; RMS gammas [C] -> [C, 1, 1, 1]
  (residual / output norms) or [C, 1, 1] (attention norms, named `norm`)."""
  shape = tuple(shape)
  if path[-1] == "kernel":
    return (shape[-1], shape[-2], *shape[:-2])
  if path[-1] == "gamma":
    return (shape[0], *(1,) * (2 if path[-2] == "norm" else 3))
  return shape


def _to_torch(path, value: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    k = value.ndim - 2
    value = np.transpose(value, (k + 1, k, *range(k)))
  return value.reshape(_torch_shape(path, value.shape) if path[-1] == "gamma" else value.shape)


def to_diffusers_state_dict(params) -> dict[str, np.ndarray]:
  """Our param tree -> diffusers `AutoencoderKLWan` state dict (numpy fp32): the loader's inverse."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = tuple(k.key for k in path)
    flat[_torch_key(names)] = np.ascontiguousarray(_to_torch(names, np.asarray(leaf, np.float32)))
  return flat


def _safetensors_files(folder: str) -> list[str]:
  index = sorted(glob.glob(os.path.join(folder, "*.safetensors.index.json")))
  if index:
    with open(index[0]) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(folder, s) for s in shards]
  files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
  if not files:
    raise VAECheckpointError(f"VAE folder {folder} holds no .safetensors file (rcm-jax reads safetensors only; "
                             "save the diffusers model with save_pretrained(safe_serialization=True)).")
  return files


def read_state_dict(folder: str) -> dict[str, np.ndarray]:
  """Every tensor of the folder's safetensors file(s) as numpy fp32 (bf16 / fp16 upcast)."""
  from safetensors import safe_open
  out = {}
  for path in _safetensors_files(folder):
    with safe_open(path, framework="numpy") as f:
      for k in f.keys():
        if f.get_slice(k).get_dtype() == "BF16":  # numpy has no bfloat16: read this one through jax
          with safe_open(path, framework="flax") as g:
            out[k] = np.asarray(g.get_tensor(k).astype(jnp.float32))
        else:
          out[k] = np.asarray(f.get_tensor(k), np.float32)
  return out


def _expected(config: WanVAEConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """diffusers key -> (our param path, our shape), from the config alone (no compute)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]:
    names = tuple(k.key for k in path)
    out[_torch_key(names)] = (names, tuple(leaf.shape))
  return out


def diffusers_shapes(config: WanVAEConfig) -> dict[str, tuple[int, ...]]:
  """The state dict keys and shapes a diffusers `AutoencoderKLWan` with this config has."""
  return {k: _torch_shape(names, shape) for k, (names, shape) in _expected(config).items()}


def params_from_state_dict(state: dict[str, np.ndarray], config: WanVAEConfig, source: str = "state dict"):
  """A diffusers state dict -> our param tree, checked against the config's shapes (one error per problem)."""
  expected = _expected(config)
  missing = sorted(set(expected) - set(state))
  unknown = sorted(set(state) - set(expected))
  if missing or unknown:
    raise VAECheckpointError(
        f"{source} does not match a Wan2.1 VAE with config {_arch(config)}: {len(missing)} missing keys {missing}, "
        f"{len(unknown)} unknown keys {unknown}.")
  bad = []
  tree: dict[str, Any] = {}
  for key, (names, shape) in expected.items():
    want = _torch_shape(names, shape)
    if tuple(state[key].shape) != want:
      bad.append(f"{key}: checkpoint {tuple(state[key].shape)} vs expected {want}")
      continue
    node = tree
    for n in names[:-1]:
      node = node.setdefault(n, {})
    node[names[-1]] = jnp.asarray(_from_torch(names, np.asarray(state[key], np.float32)))
  if bad:
    raise VAECheckpointError(f"{source}: {len(bad)} tensors have the wrong shape for config {_arch(config)}: "
                             + "; ".join(bad) + ".")
  return tree


def _arch(cfg: WanVAEConfig) -> str:
  return (f"(base_dim={cfg.base_dim}, decoder_base_dim={cfg.decoder_base_dim}, z_dim={cfg.z_dim}, dim_mult="
          f"{cfg.dim_mult}, num_res_blocks={cfg.num_res_blocks}, attn_scales={cfg.attn_scales})")


def load_vae(folder: str, dtype: str = "float32"):
  """A diffusers `AutoencoderKLWan` folder (config.json + safetensors) -> (WanVAEConfig, params).

  `folder` may also be a diffusers pipeline folder with a `vae/` subfolder. dtype: compute dtype.
  """
  folder = str(folder)
  if not os.path.exists(os.path.join(folder, "config.json")) and os.path.isdir(os.path.join(folder, "vae")):
    folder = os.path.join(folder, "vae")
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.exists(cfg_path):
    raise VAECheckpointError(f"VAE folder {folder} has no config.json (expected a diffusers AutoencoderKLWan "
                             "folder written by save_pretrained).")
  with open(cfg_path) as f:
    config = config_from_diffusers(json.load(f), dtype=dtype)
  params = params_from_state_dict(read_state_dict(folder), config, source=f"VAE folder {folder}")
  return config, params


@functools.partial(jax.jit, static_argnames=("config", "chunked"))
def encode_jit(params, video, *, config: WanVAEConfig, chunked: bool = True):
  """`encode` under jax.jit (config static)."""
  return encode(params, video, config=config, chunked=chunked)


@functools.partial(jax.jit, static_argnames=("config", "chunked"))
def decode_jit(params, latents, *, config: WanVAEConfig, chunked: bool = True):
  """`decode` under jax.jit (config static)."""
  return decode(params, latents, config=config, chunked=chunked)
