"""`WanConfig`: every knob of the Wan2.1 DiT, its named sizes, and the checks that stop bad configs early.

Field names follow Wan2.1 / diffusers' `WanTransformer3DModel` config where one exists (`dim` is diffusers'
`num_attention_heads * attention_head_dim`, `num_heads` its `num_attention_heads`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

ATTENTION_IMPLS = ("xla", "pallas", "cudnn")
REMAT_POLICIES = ("none", "full", "dots_saveable", "attention_only", "attention_out_only")
DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclasses.dataclass(frozen=True)
class WanConfig:
  """Wan2.1 DiT hyper-parameters. Frozen and hashable, so it can be a linen module attribute."""
  # --- architecture (what a checkpoint fixes) ---
  dim: int = 1536                                # model width (tokens, time embedding, all projections)
  num_heads: int = 12                            # attention heads; head_dim = dim // num_heads
  num_layers: int = 30                           # transformer blocks
  ffn_dim: int = 8960                            # hidden width of the gelu(tanh) feed-forward
  in_channels: int = 16                          # latent channels of x
  cond_channels: int = 0                         # channels of y concatenated to x (Wan i2v: 20 = 4 mask + 16)
  out_channels: int = 16                         # channels of the predicted velocity
  patch_size: tuple[int, int, int] = (1, 2, 2)   # Conv3d kernel = stride over (frames, height, width)
  text_dim: int = 4096                           # width of the context tokens (umT5: 4096)
  freq_dim: int = 256                            # sinusoidal timestep embedding width
  cross_attn_norm: bool = True                   # affine FP32 LayerNorm before cross-attention (Wan: True)
  qk_norm: bool = True                           # RMSNorm on q and k across all heads (Wan: rms_norm_across_heads)
  eps: float = 1e-6                              # epsilon of every LayerNorm / RMSNorm
  rope_theta: float = 10000.0                    # RoPE base
  rope_max_seq_len: int = 1024                   # largest RoPE position along frames, height or width
  # --- conditioning added by rcm-jax (absent from Wan checkpoints; zero-initialised where additive) ---
  num_classes: int = 0                           # >0: `labels` -> nn.Embed(num_classes + 1, text_dim) tokens
  num_actions: int = 0                           # >0: per-frame `actions` -> embedding added to the time embedding
  # --- numerics and memory (free to change for a given checkpoint) ---
  dtype: str = "float32"                         # compute dtype of dense layers and attention; params stay fp32
  attention_impl: str = "xla"                    # "xla" (reference), "pallas" (flash kernel), "cudnn" (unmasked)
  scan_layers: bool = False                      # nn.scan over blocks (stacked params, fast compile)
  remat_policy: str = "none"                     # one of REMAT_POLICIES (wan.remat_policy says what each keeps)

  def __post_init__(self):
    def bad(key, msg):
      raise ValueError(f"WanConfig.{key}: {msg}")

    for key in ("dim", "num_heads", "num_layers", "ffn_dim", "in_channels", "out_channels", "text_dim",
                "freq_dim", "rope_max_seq_len"):
      v = getattr(self, key)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        bad(key, f"must be a positive int, got {v!r}.")
    for key in ("cond_channels", "num_classes", "num_actions"):
      v = getattr(self, key)
      if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        bad(key, f"must be an int >= 0, got {v!r}.")
    if self.dim % self.num_heads:
      bad("dim", f"{self.dim} is not divisible by num_heads={self.num_heads}; pick dim = num_heads * head_dim.")
    hd = self.dim // self.num_heads
    if hd % 2 or hd % 6 not in (0, 2) or hd < 6:
      ok = [d for d in range(max(6, hd - 6), hd + 8) if d % 6 in (0, 2) and d % 2 == 0]
      bad("num_heads", f"head_dim = dim // num_heads = {hd} cannot be split for 3D RoPE: Wan splits head_dim into "
          "frame/height/width parts (d - 4*(d//6), 2*(d//6), 2*(d//6)), which must be even and agree with "
          f"diffusers' split; this needs head_dim >= 6 with head_dim % 6 in (0, 2) (e.g. {ok}, Wan uses 128). "
          "Change dim or num_heads.")
    if self.freq_dim % 2:
      bad("freq_dim", f"must be even (cos and sin halves), got {self.freq_dim}.")
    if (len(self.patch_size) != 3 or any(not isinstance(p, int) or p < 1 for p in self.patch_size)):
      bad("patch_size", f"must be 3 positive ints (frames, height, width), got {self.patch_size!r}.")
    if self.dtype not in DTYPES:
      bad("dtype", f"unknown dtype {self.dtype!r}; use one of {DTYPES}.")
    if self.attention_impl not in ATTENTION_IMPLS:
      bad("attention_impl", f"unknown attention implementation {self.attention_impl!r}; use one of "
          f"{ATTENTION_IMPLS}.")
    if self.remat_policy not in REMAT_POLICIES:
      bad("remat_policy", f"unknown remat policy {self.remat_policy!r}; use one of {REMAT_POLICIES}.")

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @property
  def compute_dtype(self) -> Any:
    return jnp.dtype(self.dtype)

  def replace(self, **overrides) -> "WanConfig":
    fields = {f.name for f in dataclasses.fields(self)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
      raise ValueError(f"WanConfig has no field(s) {unknown}; known fields: {sorted(fields)}.")
    if "patch_size" in overrides:
      overrides["patch_size"] = tuple(overrides["patch_size"])
    return dataclasses.replace(self, **overrides)


SIZES: dict[str, WanConfig] = {
    # Unit tests: milliseconds per call on CPU. head_dim 24 -> RoPE split (8, 8, 8).
    "tiny": WanConfig(dim=48, num_heads=2, num_layers=2, ffn_dim=96, in_channels=4, out_channels=4,
                      text_dim=16, freq_dim=32),
    # Toy worlds on a CPU: about 4.9M params. head_dim 32 -> RoPE split (12, 10, 10).
    "small": WanConfig(dim=256, num_heads=8, num_layers=4, ffn_dim=1024, in_channels=4, out_channels=4,
                       text_dim=256, freq_dim=256),
    # Wan2.1-T2V-1.3B.
    "wan_1p3b": WanConfig(dim=1536, num_heads=12, num_layers=30, ffn_dim=8960, in_channels=16, out_channels=16,
                          text_dim=4096, freq_dim=256),
    # Wan2.1-T2V-14B.
    "wan_14b": WanConfig(dim=5120, num_heads=40, num_layers=40, ffn_dim=13824, in_channels=16,
                         out_channels=16, text_dim=4096, freq_dim=256),
}


def get_config(size_or_config: "str | WanConfig", **overrides) -> WanConfig:
  """A named size (see `SIZES`) or a config, with field overrides applied and validated."""
  if isinstance(size_or_config, WanConfig):
    config = size_or_config
  elif isinstance(size_or_config, str):
    if size_or_config not in SIZES:
      raise ValueError(f"unknown model size {size_or_config!r}; known sizes: {sorted(SIZES)}.")
    config = SIZES[size_or_config]
  else:
    raise ValueError(f"model size must be a name from {sorted(SIZES)} or a WanConfig, got {size_or_config!r}.")
  return config.replace(**overrides) if overrides else config
