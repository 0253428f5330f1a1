"""Reference outputs of diffusers' `AutoencoderKLWan` for tests/test_interop_vae.py (runs in .venv-ref, torch CPU).

Builds a small random Wan2.1 VAE from a JSON config, perturbs its RMS gammas (all ones at init, which would
hide a wrong gamma mapping), saves it with `save_pretrained` (config.json + safetensors) to OUT/vae, then
records in OUT/ref.npz, channels-last:
  video [B, T, H, W, 3] in [-1, 1]; its posterior `mean`, `logvar`, `mode` (diffusers' chunked encode);
  `normalized`: the mode normalised as Wan's pipelines do, (mode - latents_mean) * (1 / latents_std);
  `latents` [B, F, h, w, z]: random normalised latents, and `decoded`: diffusers' decode of
  latents / (1 / latents_std) + latents_mean (as WanPipeline un-normalises), clamped to [-1, 1] by diffusers.
And OUT/wan2p1_shapes.json: {key: shape} of the default (real Wan2.1) AutoencoderKLWan, built on the meta device.

usage: python vae_ref.py OUT '{"base_dim": 8, ...}' --seed 0 --video 2,9,16,24 --latent_frames 3
"""
import argparse
import json
import os

import numpy as np
import torch
from diffusers import AutoencoderKLWan


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("out")
  ap.add_argument("config", help="AutoencoderKLWan kwargs as JSON")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--video", default="2,9,16,24", help="B,T,H,W of the clip to encode")
  ap.add_argument("--latent_frames", type=int, default=3, help="latent frames to decode")
  ap.add_argument("--out_scale", type=float, default=1.0, help="multiplies decoder.conv_out (keeps outputs in range)")
  args = ap.parse_args()
  torch.manual_seed(args.seed)
  torch.set_num_threads(1)

  vae = AutoencoderKLWan(**json.loads(args.config)).eval()
  with torch.no_grad():
    for name, p in vae.named_parameters():
      if name.endswith("gamma"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
    vae.decoder.conv_out.weight.mul_(args.out_scale)
  vae.save_pretrained(os.path.join(args.out, "vae"), safe_serialization=True)

  cfg = vae.config
  shape = (1, cfg.z_dim, 1, 1, 1)
  latents_mean = torch.tensor(cfg.latents_mean).view(shape)
  inv_std = 1.0 / torch.tensor(cfg.latents_std).view(shape)

  b, t, h, w = (int(v) for v in args.video.split(","))
  video = torch.rand(b, 3, t, h, w) * 2 - 1
  s = 2 ** (len(cfg.dim_mult) - 1)
  latents = torch.randn(b, cfg.z_dim, args.latent_frames, h // s, w // s)
  with torch.no_grad():
    dist = vae.encode(video).latent_dist
    mode = dist.mode()
    normalized = (mode - latents_mean) * inv_std
    decoded = vae.decode(latents / inv_std + latents_mean).sample

  def cl(x):  # [B, C, T, H, W] -> [B, T, H, W, C]
    return x.permute(0, 2, 3, 4, 1).contiguous().numpy().astype(np.float32)

  with torch.device("meta"):
    full = AutoencoderKLWan()
  with open(os.path.join(args.out, "wan2p1_shapes.json"), "w") as f:
    json.dump({k: list(v.shape) for k, v in full.state_dict().items()}, f)

  np.savez(os.path.join(args.out, "ref.npz"), video=cl(video), mean=cl(dist.mean), logvar=cl(dist.logvar),
           mode=cl(mode), normalized=cl(normalized), latents=cl(latents), decoded=cl(decoded))


if __name__ == "__main__":
  main()
