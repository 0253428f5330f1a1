"""Reference outputs of diffusers' `AutoencoderKLWan` for tests/test_interop_vae.py (runs in .venv-ref, torch CPU).

For each case of a JSON list, builds a small random VAE from `kwargs`, perturbs its RMS gammas (all ones at
init, which would hide a wrong gamma mapping), saves it with `save_pretrained` (config.json + safetensors) to
OUT/<name>/vae, then records in OUT/<name>/ref.npz, channels-last:
  video [B, T, H, W, 3] in [-1, 1]; its posterior `mean`, `logvar`, `mode` (diffusers' chunked encode);
  `normalized`: the mode normalised as Wan's pipelines do, (mode - latents_mean) * (1 / latents_std);
  `latents` [B, F, h, w, z]: random normalised latents, and `decoded`: diffusers' decode of
  latents / (1 / latents_std) + latents_mean (as WanPipeline un-normalises), clamped to [-1, 1] by diffusers.
And OUT/wan2p1_shapes.json: {key: shape} of the default (real Wan2.1) AutoencoderKLWan, built on the meta device.

usage: python vae_ref.py OUT '[{"name": "a", "kwargs": {"base_dim": 8, ...}, "video": [2, 9, 16, 24],
                               "latent_frames": 3, "seed": 0}, ...]'
"""
import json
import os
import sys

import numpy as np
import torch
from diffusers import AutoencoderKLWan


def cl(x):  # [B, C, T, H, W] -> [B, T, H, W, C]
  return x.permute(0, 2, 3, 4, 1).contiguous().numpy().astype(np.float32)


def run_case(out, case):
  torch.manual_seed(case.get("seed", 0))
  vae = AutoencoderKLWan(**case["kwargs"]).eval()
  with torch.no_grad():
    for name, p in vae.named_parameters():
      if name.endswith("gamma"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  vae.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)

  cfg = vae.config
  shape = (1, cfg.z_dim, 1, 1, 1)
  latents_mean = torch.tensor(cfg.latents_mean).view(shape)
  inv_std = 1.0 / torch.tensor(cfg.latents_std).view(shape)
  b, t, h, w = case["video"]
  s = 2 ** (len(cfg.dim_mult) - 1)
  video = torch.rand(b, 3, t, h, w) * 2 - 1
  latents = torch.randn(b, cfg.z_dim, case["latent_frames"], h // s, w // s)
  with torch.no_grad():
    dist = vae.encode(video).latent_dist
    mode = dist.mode()
    normalized = (mode - latents_mean) * inv_std
    decoded = vae.decode(latents / inv_std + latents_mean).sample
  np.savez(os.path.join(out, "ref.npz"), video=cl(video), mean=cl(dist.mean), logvar=cl(dist.logvar),
           mode=cl(mode), normalized=cl(normalized), latents=cl(latents), decoded=cl(decoded))


def main():
  out, cases = sys.argv[1], json.loads(sys.argv[2])
  torch.set_num_threads(1)
  for case in cases:
    run_case(os.path.join(out, case["name"]), case)
  with torch.device("meta"):
    full = AutoencoderKLWan()
  with open(os.path.join(out, "wan2p1_shapes.json"), "w") as f:
    json.dump({k: list(v.shape) for k, v in full.state_dict().items()}, f)


if __name__ == "__main__":
  main()
