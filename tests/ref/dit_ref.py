"""Reference side of the Wan DiT parity tests; runs under .venv-ref (torch CPU, diffusers 0.42.1), never in rcm-jax.

Usage: python tests/ref/dit_ref.py OUT_DIR. For each case below it builds a SMALL randomly initialised diffusers
`WanTransformer3DModel`, saves it as a diffusers folder (`OUT_DIR/<case>/diffusers`, sharded for one case) and
as the original Wan2.1 layout (`OUT_DIR/<case>/original`: a safetensors state dict under the original key names
+ the original `WanModel` config.json; the renaming is written here and checked against diffusers' own
original -> diffusers converter), runs it on random inputs with one time per sample ([B]) and one time per
latent frame (given to diffusers as per-token timesteps [B, L]), in float32 and float64, and writes
`OUT_DIR/<case>/io.npz` (channels-first, like torch).
"""
import json
import os
import sys

import numpy as np
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import save_file

BASE = dict(num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4, text_dim=32,
            freq_dim=32, ffn_dim=64, num_layers=2, patch_size=(1, 2, 2))
CASES = {
    # Wan2.1 T2V switches: cross-attention norm on, q/k RMSNorm; single safetensors file.
    "t2v": dict(BASE, cross_attn_norm=True, qk_norm="rms_norm_across_heads"),
    # cross-attention norm off, qk_norm=None (diffusers still applies norm_q / norm_k), temporal patch 2,
    # sharded safetensors with an index json; original layout under the `model.diffusion_model.` prefix.
    "no_xnorm_pt2": dict(BASE, cross_attn_norm=False, qk_norm=None, patch_size=(2, 2, 2), eps=1e-5),
    # extra input channels (concatenated conditioning, Wan i2v style without the image branch).
    "cond_channels": dict(BASE, in_channels=6, cross_attn_norm=True),
    # Wan2.1 I2V: CLIP image branch -> our loader must refuse it (saved, not run).
    "i2v": dict(BASE, in_channels=6, image_dim=8, added_kv_proj_dim=48, cross_attn_norm=True),
}
SHARDED = {"no_xnorm_pt2"}
PREFIXED = {"no_xnorm_pt2"}

# diffusers -> original Wan2.1 names (prefix match, first hit wins).
TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    ("proj_out.", "head.head."),
    ("scale_shift_table", "head.modulation"),
]
BLOCK_PARTS = [
    ("attn1.to_out.0.", "self_attn.o."), ("attn1.to_", "self_attn."), ("attn1.", "self_attn."),
    ("attn2.to_out.0.", "cross_attn.o."), ("attn2.add_k_proj.", "cross_attn.k_img."),
    ("attn2.add_v_proj.", "cross_attn.v_img."), ("attn2.norm_added_k.", "cross_attn.norm_k_img."),
    ("attn2.to_", "cross_attn."), ("attn2.", "cross_attn."), ("norm2.", "norm3."), ("ffn.net.0.proj.", "ffn.0."),
    ("ffn.net.2.", "ffn.2."), ("scale_shift_table", "modulation"),
]


def to_original(key: str) -> str:
  if key.startswith("blocks."):
    _, i, rest = key.split(".", 2)
    for a, b in BLOCK_PARTS:
      if rest.startswith(a):
        return f"blocks.{i}.{b}{rest[len(a):]}"
    raise KeyError(key)
  for a, b in TO_ORIGINAL:
    if key.startswith(a):
      return b + key[len(a):]
  if key.startswith("patch_embedding."):
    return key
  raise KeyError(key)


def original_config(cfg: dict) -> dict:
  heads = cfg["num_attention_heads"]
  return {"_class_name": "WanModel", "model_type": "i2v" if cfg.get("image_dim") else "t2v",
          "patch_size": list(cfg["patch_size"]), "text_len": 512, "in_dim": cfg["in_channels"],
          "dim": heads * cfg["attention_head_dim"], "ffn_dim": cfg["ffn_dim"], "freq_dim": cfg["freq_dim"],
          "text_dim": cfg["text_dim"], "out_dim": cfg["out_channels"], "num_heads": heads,
          "num_layers": cfg["num_layers"], "window_size": [-1, -1], "qk_norm": True,
          "cross_attn_norm": cfg["cross_attn_norm"], "eps": cfg.get("eps", 1e-6)}


def main(out_dir: str) -> None:
  diffusers_logging.set_verbosity_error()
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  for name, cfg in CASES.items():
    case = os.path.join(out_dir, name)
    model = WanTransformer3DModel(**cfg).eval()
    with torch.no_grad():   # norm weights away from 1 / 0 so a wrong mapping shows
      for key, p in model.named_parameters():
        if "norm" in key:
          p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(os.path.join(case, "diffusers"), safe_serialization=True,
                          max_shard_size="20KB" if name in SHARDED else "10GB")
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    original = {to_original(k): v for k, v in sd.items()}
    back = convert_wan_transformer_to_diffusers(dict(original))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd), "original renaming is wrong"
    prefix = "model.diffusion_model." if name in PREFIXED else ""
    os.makedirs(os.path.join(case, "original"), exist_ok=True)
    save_file({prefix + k: v for k, v in original.items()},
              os.path.join(case, "original", "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(case, "original", "config.json"), "w") as f:
      json.dump(original_config(cfg), f, indent=2)
    if cfg.get("image_dim"):
      continue
    pt, ph, pw = cfg["patch_size"]
    b, frames, h, w, lc = 2, 3 * pt, 4, 6, 5
    f, tokens = frames // pt, (h // ph) * (w // pw)
    x = rng.standard_normal((b, cfg["in_channels"], frames, h, w)).astype(np.float32)
    ctx = rng.standard_normal((b, lc, cfg["text_dim"])).astype(np.float32)
    t_sample = rng.uniform(0, 1, (b,)).astype(np.float32)
    t_frame = rng.uniform(0, 1, (b, f)).astype(np.float32)
    io = dict(x=x, context=ctx, t_sample=t_sample, t_frame=t_frame)
    for dtype, tag in ((torch.float32, "32"), (torch.float64, "64")):
      m = model.to(dtype)
      with torch.no_grad():
        args = dict(hidden_states=torch.from_numpy(x).to(dtype),
                    encoder_hidden_states=torch.from_numpy(ctx).to(dtype), return_dict=False)
        ts = torch.from_numpy(1000.0 * t_sample.astype(np.float64)).to(dtype)
        io["out_sample_" + tag] = m(timestep=ts, **args)[0].double().numpy()
        per_token = np.repeat(1000.0 * t_frame.astype(np.float64), tokens, axis=1)     # [B, L]
        io["out_frame_" + tag] = m(timestep=torch.from_numpy(per_token).to(dtype), **args)[0].double().numpy()
    np.savez(os.path.join(case, "io.npz"), **io)


if __name__ == "__main__":
  main(sys.argv[1])
