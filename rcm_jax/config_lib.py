"""Config helpers shared by the files in configs/: `parse_arg` (big_vision style) and the toy defaults.

Config files stay flat and readable: each one calls `toy_base(arg)` at most once and overrides a few
keys, so there is no inheritance chain; the resolved config is written to <workdir>/config.json.
"""
from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'world=camera_pan,runlocal' -> ConfigDict(world='camera_pan', runlocal=True, ...) typed like defaults."""
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; this config takes {sorted(defaults)}.")
    default = defaults[key]
    if isinstance(default, bool):
      out[key] = value.lower() in ("", "1", "true", "yes")
    elif value == "":
      raise ValueError(f"Config argument {key!r} needs a value, e.g. {key}={default}.")
    else:
      out[key] = type(default)(value)
  return out


# World settings of the toy recipe: 32 px, 8 frames, frames used directly as latents.
TOY_WORLDS = {
    "moving_digits": dict(size=32, frames=8, channels=1, digit_size=14, min_digits=1, max_digits=2),
    "camera_pan": dict(size=32, frames=8, channels=3, photo_height=96, step=3),
}


def toy_base(arg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Defaults of one bidirectional-teacher stage on a toy world (rectified flow)."""
  if arg.world not in TOY_WORLDS:
    raise ValueError(f"Unknown world {arg.world!r} (config argument world=); choose one of {sorted(TOY_WORLDS)}.")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.world = arg.world                        # which toy world (rcm_jax.data.worlds.WORLDS)
  c.data = ml_collections.ConfigDict()
  c.data.world = dict(TOY_WORLDS[arg.world])  # the world's own config (size, frames, channels, ...)
  c.data.num_train_videos = 4096             # written once to ArrayRecord shards under <workdir>/data
  c.data.num_eval_videos = 128               # held-out split ("test"): evaluation conditions and the ceiling
  c.data.seed = 0
  c.data.source = "real"                     # training videos: "real" (the world's train split) | "teacher"
                                             # (samples of a `generate` stage; the paper trains only on those)
  c.data.teacher_from = ""                   # source="teacher": a generate stage (name or dir) or a dataset dir

  c.model = ml_collections.ConfigDict()
  c.model.size = "small"                     # rcm_jax.models.config.SIZES; the keys below override its fields
  c.model.dim, c.model.num_heads, c.model.num_layers, c.model.ffn_dim = 128, 4, 4, 512   # 1.2M params
  c.model.text_dim, c.model.freq_dim = 128, 128
  c.model.patch_size = (1, 8, 8)             # 32 px frames -> 4 x 4 tokens per frame: CPU-sized
  c.model.dtype = "float32"                  # compute dtype; params are always fp32 ("bfloat16" on GPU)
  c.model.attention_impl = "xla"             # "xla" | "pallas" | "cudnn"
  c.model.scan_layers = False
  c.model.remat_policy = "none"              # none | full | dots_saveable | attention_only | attention_out_only

  c.mesh = ml_collections.ConfigDict()      # device mesh (rcm_jax.parallel.mesh); product = device count,
  c.mesh.data = -1                           #   -1 = all devices left; data: batch split, params replicated
  c.mesh.fsdp = 1                            #   batch split and params / EMA / optimizer state split too
  c.mesh.context = 1                         #   token sequence: Ulysses context parallelism (divides tokens and heads)
  c.mesh.tensor = 1                          #   heads and MLP hidden dim
  # logical axis -> mesh axes ("" replicated, "data,fsdp" split over both); rcm_jax.parallel.sharding
  c.sharding_rules = ml_collections.ConfigDict(dict(
      batch="data,fsdp", embed="fsdp", mlp="tensor", heads="tensor", kv="", frames="", tokens="context",
      layers="", vocab=""))

  c.recipe = "rf"                            # rcm_jax.recipes registry
  c.init_from = ""                           # a stage dir whose checkpoint initialises the params
  c.init_from_ema = True
  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.time_sampler = "logit_normal"  # "logit_normal" | "uniform_shift"
  c.diffusion.time_sampler_kwargs = dict(mean=0.0, std=1.0)
  c.diffusion.p_uncond = 0.1                 # CFG dropout of the conditions

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1500
  c.train.batch_size = 16
  c.train.grad_accum = 1                     # micro-batches per update (batch_size must divide)
  c.train.log_every = 10
  c.train.ckpt_every = 250
  c.train.keep = 2                           # checkpoints kept
  c.train.nan_patience = 20                  # stop after this many non-finite updates in a row
  c.train.profile = ""                       # "start:end" steps to trace with jax.profiler
  c.train.progress = True
  c.train.sample_at_end = True

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
  c.optim.weight_decay = 0.01
  c.optim.warmup_steps = 100
  c.optim.clip_norm = 1.0
  c.optim.mu_dtype = "float32"   # Adam's first moment; "bfloat16" halves its memory

  c.ema = ml_collections.ConfigDict()
  c.ema.kind = "power"                       # "none" | "classic" | "power" (EDM2)
  c.ema.decay = 0.999                        # classic
  c.ema.std = 0.1                            # power: relative width of the averaging profile

  c.sample = ml_collections.ConfigDict()
  c.sample.checkpoint = ""                   # stage dir to sample from ("" = the workdir itself)
  c.sample.use_ema = True
  c.sample.steps = 16
  c.sample.cfg_scale = 2.0
  c.sample.shift = 1.0
  c.sample.first_chunk_steps = 4            # consistency: the first chunk's steps (paper: 4; 1 or 2: lower latency)
  c.sample.num_videos = 32
  c.sample.gemm_epilogues = True           # sample/play: XLA folds bias + gelu into cuBLASLt (rcm_jax/xla_flags.py)
  c.sample.runtime_masks = False           # streaming: chunk masks as run-time inputs, one compile per chunk role
  c.sample.batch_size = 32

  c.generate = ml_collections.ConfigDict()  # teacher samples for the train-split conditions (data.source)
  c.generate.checkpoint = ""                 # teacher stage dir ("" = the workdir itself)
  c.generate.use_ema = True
  c.generate.steps = 16                      # Euler steps of the teacher's sampler
  c.generate.cfg_scale = 2.0
  c.generate.shift = 1.0
  c.generate.sampler = "bidirectional"       # "bidirectional" | "causal" (a causal teacher)
  c.generate.num_videos = 0                  # 0 = one per train-split video (data.num_train_videos)
  c.generate.shard_size = 256                # videos per shard: the unit of resumption and of process sharding
  c.generate.batch_size = 64                 # videos per sampler call
  c.generate.video_dtype = "float16"         # teacher samples are off the 8-bit grid: "float16" | "float32"
  c.generate.seed = 0                        # noise of shard s = fold_in(key(seed), s)
  c.generate.name = ""                       # writes <data root>/<world>_teacher_<name>; "" = the workdir's name

  c.eval = ml_collections.ConfigDict()
  c.eval.checkpoint = ""
  c.eval.use_ema = True
  c.eval.label = "teacher"
  c.eval.steps = (4, 8, 16, 50)
  c.eval.cfg_scale = 2.0
  c.eval.num_videos = 64
  c.eval.batch_size = 64
  c.eval.timing = True                       # a second pass per setting to report samples/s (compiled)

  if arg.runlocal:   # every config is a smoke test: seconds on a laptop
    c.model.dim, c.model.num_heads, c.model.num_layers, c.model.ffn_dim = 48, 2, 2, 96
    c.data.num_train_videos, c.data.num_eval_videos = 64, 8
    c.train.num_steps, c.train.batch_size, c.train.log_every, c.train.ckpt_every = 4, 4, 1, 2
    c.optim.warmup_steps = 2
    c.sample.num_videos = c.sample.batch_size = 4
    c.sample.steps = 2
    c.eval.steps = (1, 2)
    c.eval.num_videos = c.eval.batch_size = 8
    c.generate.steps, c.generate.shard_size, c.generate.batch_size = 2, 16, 16
  return c
