"""Wan2.1-T2V-1.3B text-to-video: umT5 text -> bidirectional DiT with CFG (Euler, shifted grid) -> Wan VAE -> mp4.

Weights (see README "Wan2.1 weights"): convert the DiT once, then point the job at it and at the diffusers
repo's text_encoder/, tokenizer/ and vae/ folders:

  python -m rcm_jax.main convert --src Wan2.1-T2V-1.3B-Diffusers/transformer --dst ckpt/wan_1p3b
  python -m rcm_jax.main sample --config=configs/wan2p1/t2v_1p3b.py --workdir=runs/t2v \
      --config.checkpoint=ckpt/wan_1p3b --config.text.encoder=Wan2.1-T2V-1.3B-Diffusers/text_encoder \
      --config.text.tokenizer=Wan2.1-T2V-1.3B-Diffusers/tokenizer --config.vae=Wan2.1-T2V-1.3B-Diffusers/vae \
      --config.sample.prompts='("A cat walks on the grass, realistic style.",)'

Cached umT5 embeddings replace the encoder: --config.text.embeddings=prompts.npz (and
text.negative_embeddings for CFG); see rcm_jax.interop.umt5.load_text_embeddings.
`:tiny` runs the same pipeline with random weights (tiny DiT, umT5 and VAE): a smoke test in seconds on a CPU.
Sampler defaults follow Wan2.1's generate.py for T2V (50 steps, guide scale 5, shift 5, 81 x 480 x 832 at 16 fps).
"""
import ml_collections

from rcm_jax.config_lib import parse_arg

# Wan2.1's default negative prompt (its shared config's sample_neg_prompt).
WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                       "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
                       "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


def get_config(arg=None):
  arg = parse_arg(arg, tiny=False)
  c = ml_collections.ConfigDict()
  c.pipeline = "wan_t2v"                  # the sample job runs rcm_jax.interop.t2v
  c.seed = 0
  c.checkpoint = ""                       # DiT: a `convert` --dst (or a trained stage dir); required unless tiny
  c.use_ema = True                        # a trained stage's EMA params if it has them
  c.random_weights = bool(arg.tiny)       # tiny: random DiT, umT5 and VAE instead of checkpoints

  c.model = ml_collections.ConfigDict()  # must match the converted checkpoint (its convert.json "model")
  c.model.size = "wan_1p3b"               # rcm_jax.models.config.SIZES; keys below override its fields
  c.model.dtype = "bfloat16"              # compute dtype; params stay fp32
  c.model.attention_impl = "cudnn"        # unmasked bidirectional attention on GPU; "xla" | "pallas" | "cudnn"
  c.model.scan_layers = False             # True needs `convert --scan_layers`
  c.model.remat_policy = "none"

  c.text = ml_collections.ConfigDict()
  c.text.encoder = ""                     # transformers UMT5EncoderModel folder (Wan diffusers repo: text_encoder/)
  c.text.tokenizer = ""                   # folder with tokenizer.json ("" = text.encoder's folder)
  c.text.dtype = "bfloat16"               # umT5 params and matmuls (norms fp32); Wan runs it in bf16
  c.text.embeddings = ""                  # cached embeddings (.npz / .npy / folder) instead of the encoder
  c.text.negative_embeddings = ""         # cached embedding of the negative prompt (CFG with text.embeddings)
  c.text.text_len = 512                   # tokens per prompt (Wan: 512, zero-padded past each prompt)

  c.vae = ""                              # diffusers AutoencoderKLWan folder (Wan diffusers repo: vae/)
  c.vae_dtype = "float32"

  c.sample = ml_collections.ConfigDict()
  c.sample.prompts = ("A cat walks on the grass, realistic style.",)
  c.sample.negative_prompt = WAN_NEGATIVE_PROMPT
  c.sample.steps = 50
  c.sample.cfg_scale = 5.0
  c.sample.shift = 5.0                    # time shift of the Euler grid (Wan2.1 T2V: 5)
  c.sample.frames = 81                    # video frames: 1 + 4k (latent frames 1 + k)
  c.sample.height = 480
  c.sample.width = 832
  c.sample.fps = 16
  c.sample.batch_size = 1                 # prompts per sampler call
  c.sample.gemm_epilogues = True          # XLA folds bias + gelu into cuBLASLt (rcm_jax/xla_flags.py)

  if arg.tiny:   # random weights, a few latent tokens: seconds on a CPU
    c.model.size = "tiny"
    c.model.dtype = "float32"
    c.model.attention_impl = "xla"        # runs on a CPU
    c.model.text_dim = 32                 # the tiny umT5's d_model
    c.text.dtype = "float32"
    c.text.text_len = 16
    c.sample.prompts = ("a red ball", "two cats")
    c.sample.negative_prompt = "blurry"
    c.sample.steps = 2
    c.sample.cfg_scale = 3.0
    c.sample.frames, c.sample.height, c.sample.width, c.sample.fps = 5, 32, 32, 4
    c.sample.batch_size = 2
  return c
