"""Reference side of the umT5 parity tests; runs under .venv-ref (torch CPU, transformers 5.24), never in rcm-jax.

Usage: python tests/ref/umt5_ref.py OUT_DIR. Builds a tiny T5 tokenizer (a Unigram vocabulary written here) and a
SMALL randomly initialised transformers `UMT5EncoderModel`, saves both into OUT_DIR/umt5 (config.json,
model.safetensors, tokenizer.json, ...), tokenizes a few prompts the way diffusers' WanPipeline does (pad to
max_length, truncate, attention mask), runs the encoder in float32 and float64 and writes OUT_DIR/io.npz with
the prompts, ids, masks, outputs and transformers' own relative-position bucket table.
"""
import os
import sys

import numpy as np
import torch
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel
from transformers.utils import logging as hf_logging

MAX_LENGTH = 24
PROMPTS = [
    "a cat runs on the grass",
    "The dog, the cat and a bird sing in the rain at night while the wind blows over the old red house!",
    "zebra? ünïcode 猫 text",
    "  two   spaces  ",
]
WORDS = ["a", "the", "cat", "dog", "bird", "runs", "sing", "in", "on", "at", "grass", "rain", "night", "wind",
         "over", "old", "red", "house", "and", "while", "blows", "two", "spaces", "text"]


def tokenizer() -> T5Tokenizer:
  vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
  vocab += [("▁" + w, -3.0 - 0.1 * i) for i, w in enumerate(WORDS)]
  vocab += [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyzTD,!?."]
  vocab += [("ing", -4.0), ("s", -4.5), ("er", -4.5)]
  return T5Tokenizer(vocab=vocab, extra_ids=0)


def main(out_dir: str) -> None:
  hf_logging.set_verbosity_error()
  torch.manual_seed(0)
  tok = tokenizer()
  cfg = UMT5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=32, relative_attention_max_distance=128,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0)
  model = UMT5EncoderModel(cfg).eval()
  with torch.no_grad():   # norm weights away from 1 so a wrong mapping shows
    for key, p in model.named_parameters():
      if "norm" in key:
        p.add_(0.3 * torch.randn_like(p))
  folder = os.path.join(out_dir, "umt5")
  model.save_pretrained(folder, safe_serialization=True)
  tok.save_pretrained(folder)
  enc = tok(PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True, add_special_tokens=True,
            return_attention_mask=True, return_tensors="pt")
  io = dict(prompts=np.asarray(PROMPTS), input_ids=enc.input_ids.numpy(), mask=enc.attention_mask.numpy())
  for dtype, tag in ((torch.float32, "32"), (torch.float64, "64")):
    with torch.no_grad():
      out = model.to(dtype)(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    io["out_" + tag] = out.double().numpy()
  attn = model.encoder.block[0].layer[0].SelfAttention
  pos = torch.arange(300)
  io["buckets_300"] = attn._relative_position_bucket(pos[None, :] - pos[:, None]).numpy()
  np.savez(os.path.join(out_dir, "io.npz"), **io)


if __name__ == "__main__":
  main(sys.argv[1])
