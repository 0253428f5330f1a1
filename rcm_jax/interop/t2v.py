"""The Wan2.1 text-to-video sample job (configs/wan2p1/): prompts -> umT5 -> bidirectional DiT with CFG -> VAE -> mp4.

Owns `sample(config, workdir)`, which `training.jobs.sample` runs for configs with `pipeline = "wan_t2v"`, and
the loading of its three parts with checks that name the config key to fix: the DiT (`config.checkpoint`, a
`convert` output or a trained stage; its tree must fit `config.model`), the text context (`config.text.encoder`
or cached `config.text.embeddings`; width = model text_dim) and the VAE (`config.vae`; z_dim = the DiT's
channels). With `config.random_weights` (the config's `:tiny` variant) all three are random and tiny.
Causal students stream through their own job (issue 6), not here.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from rcm_jax import models as models_lib
from rcm_jax.errors import UserError
from rcm_jax.inference import bidirectional
from rcm_jax.interop import umt5, wan_vae
from rcm_jax.models.wan import dummy_inputs
from rcm_jax.training import checkpoint
from rcm_jax.training.setup import check_params_match
from rcm_jax.training.writer import write_metrics, write_video

TINY_UMT5 = umt5.UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)


def make_model(config) -> models_lib.WanModel:
  fields = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(config.model).items() if k != "size"}
  try:
    return models_lib.build_model(config.model.size, **fields)
  except ValueError as e:
    raise UserError(f"config.model: {e}") from None


def _check(config):
  s = config.sample
  if not config.random_weights:
    for key in ("checkpoint", "vae"):
      if not config[key]:
        raise UserError(f"config.{key} is empty: set --config.{key}=... (see configs/wan2p1/t2v_1p3b.py), or use "
                        "the config's :tiny variant for random weights.")
    if not config.text.encoder and not config.text.embeddings:
      raise UserError("set --config.text.encoder (a UMT5EncoderModel folder) or --config.text.embeddings (cached "
                      "umT5 embeddings).")
  if (s.frames - 1) % 4 or s.frames < 1:
    raise UserError(f"sample.frames={s.frames}: the Wan VAE needs 1 + 4k frames (e.g. 81).")
  if s.height % 16 or s.width % 16:
    raise UserError(f"sample.height x width = {s.height} x {s.width}: both must be multiples of 16 (VAE 8 x patch 2).")
  if s.batch_size < 1 or s.steps < 1:
    raise UserError(f"sample.batch_size ({s.batch_size}) and sample.steps ({s.steps}) must be >= 1.")


def random_like(abstract, seed: int):
  """Random params for a shape tree, drawn with numpy (a jitted linen init compiles one RNG per param: slow on
  CPU): matrices N(0, 1/fan_in), 1-D scales 1, biases 0, other vectors N(0, 1/size)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if len(leaf.shape) >= 2:
      return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1])), leaf.dtype)
    if name == "scale":
      return jnp.ones(leaf.shape, leaf.dtype)
    if name == "bias":
      return jnp.zeros(leaf.shape, leaf.dtype)
    return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(leaf.size), leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, abstract)


def load_dit(config, model):
  """The DiT's variables {"params": tree}: from config.checkpoint, or random (random_weights)."""
  args, kwargs = dummy_inputs(model.config)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
  if config.random_weights:
    return random_like(abstract, config.seed)
  variables, step = checkpoint.load_params(config.checkpoint, use_ema=config.use_ema)
  try:
    check_params_match(variables, abstract, config.checkpoint)
  except UserError as e:
    raise UserError(f"config.checkpoint: {e} (config.model must match the checkpoint's convert.json).") from None
  return variables


def text_context(config, prompts: list[str]):
  """(prompts, context [N, text_len, D], negative context [1, text_len, D] or None) per config.text."""
  t = config.text
  neg = None
  guided = config.sample.cfg_scale != 1.0
  if t.embeddings:
    cached_prompts, ctx = umt5.load_text_embeddings(t.embeddings, text_len=t.text_len)
    prompts = cached_prompts or [f"prompt_{i}" for i in range(ctx.shape[0])]
    if guided:
      if not t.negative_embeddings:
        raise UserError("sample.cfg_scale != 1 with cached text.embeddings needs text.negative_embeddings (the "
                        "cached negative prompt), or set sample.cfg_scale=1.")
      _, neg = umt5.load_text_embeddings(t.negative_embeddings, text_len=t.text_len)
      neg = neg[:1]
    return prompts, ctx, neg
  if config.random_weights:
    abstract = jax.eval_shape(lambda: umt5.UMT5Encoder(TINY_UMT5).init(
        jax.random.key(0), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32)))
    encoder = umt5.TextEncoder(TINY_UMT5, random_like(abstract, config.seed + 1)["params"], umt5.tiny_tokenizer(),
                               t.text_len)
  else:
    encoder = umt5.load_text_encoder(t.encoder, t.tokenizer, dtype=t.dtype, text_len=t.text_len)
  texts = list(prompts) + ([config.sample.negative_prompt] if guided else [])
  ctx, _ = encoder.encode(texts, batch_size=max(config.sample.batch_size, 1))
  return list(prompts), ctx[:len(prompts)], (ctx[len(prompts):] if guided else None)


def load_vae(config):
  if config.random_weights:
    cfg = wan_vae.TINY
    return cfg, wan_vae.init_params(config.seed, cfg)
  return wan_vae.load_vae(config.vae, dtype=config.vae_dtype)


def sample(config, workdir: str) -> dict:
  """Videos for config.sample.prompts (or the cached embeddings' prompts) -> <workdir>/samples/*.mp4."""
  _check(config)
  checkpoint.guard_workdir(config, workdir)
  s = config.sample
  rng_noise = jax.random.key(config.seed)
  model = make_model(config)
  variables = load_dit(config, model)
  prompts, ctx, neg = text_context(config, list(s.prompts))
  if ctx.shape[-1] != model.config.text_dim:
    raise UserError(f"text embeddings have width {ctx.shape[-1]} but config.model text_dim is "
                    f"{model.config.text_dim}; the text encoder / cached embeddings do not belong to this DiT.")
  vae_cfg, vae_params = load_vae(config)
  if vae_cfg.z_dim != model.config.in_channels or model.config.cond_channels:
    raise UserError(f"config.vae has z_dim {vae_cfg.z_dim} but the DiT takes {model.config.in_channels} latent "
                    f"channels (+{model.config.cond_channels} conditioning); they must match (T2V only).")
  latent_shape = vae_cfg.latent_shape((1, s.frames, s.height, s.width, 3))[1:]
  decode = jax.jit(lambda p, z: wan_vae.decode(p, z, config=vae_cfg))
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  files, latents_all = [], []
  for i in range(0, len(prompts), s.batch_size):
    c = jnp.asarray(ctx[i:i + s.batch_size])
    b = c.shape[0]
    noise = jax.random.normal(jax.random.fold_in(rng_noise, i), (b, *latent_shape), jnp.float32)
    null = {"context": jnp.broadcast_to(jnp.asarray(neg), (b, *neg.shape[1:]))} if neg is not None else \
        {"context": c}
    latents = bidirectional.sample(model, variables, noise, {"context": c}, null, num_steps=s.steps,
                                   cfg_scale=float(s.cfg_scale), shift=float(s.shift))
    video = np.asarray(decode(vae_params, latents))                       # [b, frames, H, W, 3] in [-1, 1]
    latents_all.append(np.asarray(latents))
    for j in range(b):
      files.append(write_video(os.path.join(out_dir, f"t2v_{i + j:03d}.mp4"), video[j:j + 1], fps=s.fps, scale=1))
  np.savez(os.path.join(out_dir, "latents.npz"), latents=np.concatenate(latents_all), prompts=np.asarray(prompts))
  result = {"source": config.checkpoint or "random weights", "prompts": prompts, "videos": files,
            "frames": s.frames, "height": s.height, "width": s.width, "steps": s.steps, "cfg_scale": s.cfg_scale,
            "shift": s.shift}
  write_metrics(workdir, result)
  for p, f in zip(prompts, files):
    print(f"{f}: {p}")
  return result
