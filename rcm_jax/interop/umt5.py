"""The umT5 text encoder of Wan2.1 in Flax, its tokenizer, and cached text embeddings.

Owns: `UMT5Config` (from a transformers `UMT5EncoderModel` config.json), the `UMT5Encoder` linen module
(per-layer relative position buckets as umT5 has them, unscaled dot-product attention, gated-GELU(tanh)
feed-forward, RMS norm computed in fp32), loading its safetensors weights (`interop.wan.read_state_dict`, no
torch), the tokenizer read from the same folder's `tokenizer.json` with the `tokenizers` package,
`encode_prompts` (Wan's convention: pad / truncate to text_len = 512 tokens, then zero the embeddings past each
prompt's length), and the precomputed-embedding path (`save_text_embeddings` / `load_text_embeddings`) that
training runs use instead of the 5.7B-parameter encoder.
"""
from __future__ import annotations

import dataclasses
import glob
import html
import json
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rcm_jax.errors import UserError
from rcm_jax.interop.wan import CheckpointError, read_state_dict

TEXT_LEN = 512   # Wan2.1's text length: prompts are padded / truncated to this many tokens


@dataclasses.dataclass(frozen=True)
class UMT5Config:
  """umT5 encoder hyper-parameters (transformers' UMT5Config names). umT5-XXL: 4096 / 64 x 64 / 10240 / 24."""
  vocab_size: int = 256384
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dtype: str = "float32"   # params and matmuls ("bfloat16" halves the 23 GB of fp32 XXL); norms stay fp32

  @classmethod
  def from_hf(cls, cfg: dict, src: str = "config.json", dtype: str = "float32") -> "UMT5Config":
    ff = cfg.get("feed_forward_proj", "gated-gelu")
    if ff != "gated-gelu":
      raise CheckpointError(f"{src}: feed_forward_proj={ff!r}; rcm-jax's umT5 implements 'gated-gelu' only "
                            "(every umT5 / Wan2.1 text encoder uses it).")
    fields = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
    return cls(dtype=dtype, **{k: cfg[k] for k in fields if k in cfg})


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """int32[length, length] bucket of (key position - query position), bidirectional, as umT5's encoder does.

  Half the buckets per sign; inside a half, distances below num_buckets / 4 get their own bucket, larger ones
  share log-spaced buckets up to max_distance. The log is taken in float32 like the reference.
  """
  rel = np.arange(length)[None, :] - np.arange(length)[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  dist = np.abs(rel)
  max_exact = half // 2
  ratio = np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(max_exact))
  ratio = ratio / np.float32(math.log(max_distance / max_exact))
  large = max_exact + (ratio * np.float32(half - max_exact)).astype(np.int64, casting="unsafe")
  large = np.minimum(large, half - 1)
  return (buckets + np.where(dist < max_exact, dist, large)).astype(np.int32)


def _rms_norm(name: str, eps: float):
  """T5 layer norm: x / rms(x) in fp32, times a learned scale (no mean, no bias)."""
  return nn.RMSNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


class UMT5Block(nn.Module):
  config: UMT5Config

  @nn.compact
  def __call__(self, h, bias_mask, buckets):
    """h: [B, L, d_model] fp32; bias_mask: [B, 1, 1, L] additive; buckets: int[L, L] -> [B, L, d_model]."""
    cfg = self.config
    dt = jnp.dtype(cfg.dtype)
    lin = lambda n, name: nn.Dense(n, use_bias=False, dtype=dt, param_dtype=dt, name=name)
    b, length, _ = h.shape
    heads = lambda x: x.reshape(b, length, cfg.num_heads, cfg.d_kv)
    x = _rms_norm("attn_norm", cfg.layer_norm_epsilon)(h).astype(dt)
    q, k, v = heads(lin(cfg.num_heads * cfg.d_kv, "q")(x)), heads(lin(cfg.num_heads * cfg.d_kv, "k")(x)), \
        heads(lin(cfg.num_heads * cfg.d_kv, "v")(x))
    rel = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, param_dtype=jnp.float32,
                   name="relative_attention_bias")(buckets)                      # [L, L, H]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)  # no 1/sqrt(d) in T5
    scores = scores + rel.transpose(2, 0, 1)[None] + bias_mask
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    o = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, cfg.num_heads * cfg.d_kv)
    h = h + lin(cfg.d_model, "o")(o).astype(jnp.float32)
    x = _rms_norm("ff_norm", cfg.layer_norm_epsilon)(h).astype(dt)
    gate = nn.gelu(lin(cfg.d_ff, "wi_0")(x), approximate=True)                # gelu_new = tanh approximation
    return h + lin(cfg.d_model, "wo")(gate * lin(cfg.d_ff, "wi_1")(x)).astype(jnp.float32)


class UMT5Encoder(nn.Module):
  """umT5 encoder stack: embedding, `num_layers` blocks (each with its own relative bias table), final norm."""
  config: UMT5Config

  @nn.compact
  def __call__(self, input_ids, attention_mask):
    """input_ids, attention_mask: int[B, L] (mask 1 = token, 0 = padding) -> float32[B, L, d_model]."""
    cfg = self.config
    length = input_ids.shape[1]
    h = nn.Embed(cfg.vocab_size, cfg.d_model, param_dtype=jnp.dtype(cfg.dtype), name="shared")(input_ids)
    h = h.astype(jnp.float32)
    bias_mask = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    buckets = jnp.asarray(relative_position_buckets(length, cfg.relative_attention_num_buckets,
                                                    cfg.relative_attention_max_distance))
    for i in range(cfg.num_layers):
      h = UMT5Block(cfg, name=f"block_{i}")(h, bias_mask, buckets)
    return _rms_norm("final_layer_norm", cfg.layer_norm_epsilon)(h)


# ----------------------------------------------------------------------------- weights

def _hf_key(path: tuple[str, ...]) -> str:
  """Our param path -> transformers' UMT5EncoderModel state-dict key."""
  if path[0] == "shared":
    return "shared.weight"
  if path[0] == "final_layer_norm":
    return "encoder.final_layer_norm.weight"
  i = int(path[0].split("_")[1])
  name = path[1]
  if name in ("q", "k", "v", "o"):
    return f"encoder.block.{i}.layer.0.SelfAttention.{name}.weight"
  if name == "relative_attention_bias":
    return f"encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"
  if name == "attn_norm":
    return f"encoder.block.{i}.layer.0.layer_norm.weight"
  if name == "ff_norm":
    return f"encoder.block.{i}.layer.1.layer_norm.weight"
  return f"encoder.block.{i}.layer.1.DenseReluDense.{name}.weight"


def load_encoder(folder: str, *, dtype: str = "float32") -> tuple[UMT5Config, dict]:
  """(UMT5Config, params) from a transformers `UMT5EncoderModel` folder (config.json + safetensors).

  A full UMT5 checkpoint's decoder / lm_head tensors are skipped; any other unknown or missing key is one error.
  """
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.exists(cfg_path):
    raise CheckpointError(f"text encoder folder {folder} has no config.json (a transformers UMT5EncoderModel "
                          "folder, e.g. the Wan2.1 diffusers repo's text_encoder/).")
  with open(cfg_path) as f:
    config = UMT5Config.from_hf(json.load(f), cfg_path, dtype)
  sd = read_state_dict(folder)
  sd = {k: v for k, v in sd.items() if not k.startswith(("decoder.", "lm_head."))}
  if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
    sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
  sd.pop("encoder.embed_tokens.weight", None)   # tied to shared.weight
  abstract = jax.eval_shape(lambda: UMT5Encoder(config).init(
      jax.random.key(0), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32))["params"])
  want = {tuple(k.key for k in p): x for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
  by_key = {_hf_key(p): p for p in want}
  missing, unknown = sorted(set(by_key) - set(sd)), sorted(set(sd) - set(by_key))
  if missing or unknown:
    raise CheckpointError(f"{folder} does not match its UMT5 config ({config.num_layers} layers): missing keys "
                          f"({len(missing)}) {missing}; unknown keys ({len(unknown)}) {unknown}.")
  params, bad = {}, []
  for key, path in by_key.items():
    leaf = want[path]
    arr = sd[key]
    arr = arr.T if path[-1] == "kernel" else arr
    if tuple(arr.shape) != tuple(leaf.shape):
      bad.append(f"{key}: checkpoint {tuple(sd[key].shape)}, model expects "
                 f"{tuple(leaf.shape)[::-1] if path[-1] == 'kernel' else tuple(leaf.shape)}")
      continue
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = jnp.asarray(np.asarray(arr, np.float32), leaf.dtype)
  if bad:
    raise CheckpointError(f"{folder}: shape mismatch for {len(bad)} key(s): " + "; ".join(bad) + ".")
  return config, params


# ----------------------------------------------------------------------------- tokenizer

def clean_prompt(text: str) -> str:
  """Wan's prompt clean-up: HTML entities unescaped, whitespace runs collapsed (ftfy's repairs are not applied)."""
  text = html.unescape(html.unescape(text))
  return re.sub(r"\s+", " ", text).strip()


class Tokenizer:
  """umT5's tokenizer from a folder's `tokenizer.json` (what transformers saves), via the `tokenizers` package."""

  def __init__(self, folder: str = "", *, tokenizer=None):
    """From `folder`/tokenizer.json, or from a `tokenizers.Tokenizer` object (tests, random tiny pipelines)."""
    path = os.path.join(folder, "tokenizer.json")
    if tokenizer is None:
      if not os.path.exists(path):
        raise UserError(f"tokenizer folder {folder} has no tokenizer.json; re-save it with transformers "
                        "(AutoTokenizer.from_pretrained(folder).save_pretrained(folder)), which writes one.")
      from tokenizers import Tokenizer as _Tok
      tokenizer = _Tok.from_file(path)
    self._tok = tokenizer
    self.pad_id = self._tok.token_to_id("<pad>")
    if self.pad_id is None:
      raise UserError(f"{path} has no <pad> token; is this a T5 / umT5 tokenizer?")

  def __call__(self, prompts: list[str], max_length: int = TEXT_LEN) -> tuple[np.ndarray, np.ndarray]:
    """-> (input_ids, attention_mask): int32[N, max_length], padded with <pad>, truncated keeping </s>."""
    self._tok.enable_truncation(max_length)
    self._tok.enable_padding(length=max_length, pad_id=self.pad_id, pad_token="<pad>")
    enc = self._tok.encode_batch(list(prompts), add_special_tokens=True)
    return (np.asarray([e.ids for e in enc], np.int32), np.asarray([e.attention_mask for e in enc], np.int32))


def tiny_tokenizer() -> Tokenizer:
  """A character-level T5-style tokenizer (<pad>=0, </s>=1, <unk>=2, 64 ids) for random-weight smoke tests."""
  from tokenizers import Tokenizer as _Tok, models, pre_tokenizers, processors
  vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
  vocab += [(ch, -5.0) for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-ABCDEFGHIJKLMNOPQRSTUV"][:60]
  tok = _Tok(models.Unigram(vocab, unk_id=2, byte_fallback=False))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
  tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  return Tokenizer(tokenizer=tok)


# ----------------------------------------------------------------------------- the text encoder as a whole

@dataclasses.dataclass
class TextEncoder:
  """A loaded umT5 text encoder and its tokenizer: `encode(prompts)` -> Wan's context tensor."""
  config: UMT5Config
  params: dict
  tokenizer: Tokenizer
  text_len: int = TEXT_LEN

  def __post_init__(self):
    module = UMT5Encoder(self.config)
    self._apply = jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, mask))

  def encode(self, prompts: list[str], *, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """-> (context float32[N, text_len, d_model], lengths int32[N]); rows past a prompt's length are zero."""
    ids, mask = self.tokenizer([clean_prompt(p) for p in prompts], self.text_len)
    out = []
    for i in range(0, len(prompts), batch_size):
      h = np.asarray(self._apply(self.params, ids[i:i + batch_size], mask[i:i + batch_size]), np.float32)
      out.append(h * mask[i:i + batch_size, :, None])
    return np.concatenate(out), mask.sum(1).astype(np.int32)


def load_text_encoder(folder: str, tokenizer_folder: str = "", *, dtype: str = "float32",
                      text_len: int = TEXT_LEN) -> TextEncoder:
  """umT5 weights from `folder`, tokenizer from `tokenizer_folder` (default: the same folder)."""
  config, params = load_encoder(folder, dtype=dtype)
  return TextEncoder(config, params, Tokenizer(tokenizer_folder or folder), text_len)


# ----------------------------------------------------------------------------- cached embeddings

def save_text_embeddings(path: str, prompts: list[str], context: np.ndarray, lengths: np.ndarray) -> str:
  """One .npz for many prompts: prompts, embeddings trimmed to the longest prompt, lengths."""
  keep = max(int(np.max(lengths)), 1)
  np.savez(path, prompts=np.asarray(prompts, dtype=str), embeddings=np.asarray(context[:, :keep], np.float32),
           lengths=np.asarray(lengths, np.int32))
  return path


def _pad(emb: np.ndarray, length: int | None, text_len: int, src: str) -> np.ndarray:
  if emb.ndim != 2:
    raise UserError(f"{src}: a prompt's embedding must be [tokens, dim], got shape {emb.shape}.")
  if length is not None:
    emb = emb[:length]
  if emb.shape[0] > text_len:
    raise UserError(f"{src}: {emb.shape[0]} tokens > text_len {text_len}; truncate the cached embeddings.")
  out = np.zeros((text_len, emb.shape[1]), np.float32)
  out[:emb.shape[0]] = emb
  return out


def load_text_embeddings(path: str, *, text_len: int = TEXT_LEN) -> tuple[list[str] | None, np.ndarray]:
  """(prompts or None, context float32[N, text_len, D]) from cached umT5 embeddings, zero-padded like `encode`.

  path: a .npz (`embeddings` or `context` [N, L, D] or [L, D], optional `lengths` [N] and `prompts` [N]),
  a .npy ([L, D] one prompt or [N, L, D]), or a folder of such .npy / .npz files, one prompt each (sorted by
  name; the prompt is the npz's `prompts` entry, else the file name).
  """
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "*.npy")) + glob.glob(os.path.join(path, "*.npz")))
    if not files:
      raise UserError(f"text embeddings folder {path} holds no .npy or .npz files.")
    prompts, rows = [], []
    for f in files:
      p, ctx = load_text_embeddings(f, text_len=text_len)
      if ctx.shape[0] != 1:
        raise UserError(f"{f}: a folder of cached embeddings needs one prompt per file, got {ctx.shape[0]}.")
      prompts.append(p[0] if p else os.path.splitext(os.path.basename(f))[0])
      rows.append(ctx)
    return prompts, np.concatenate(rows)
  if not os.path.exists(path):
    raise UserError(f"text embeddings file {path} does not exist.")
  prompts, lengths = None, None
  if path.endswith(".npz"):
    with np.load(path) as z:
      key = "embeddings" if "embeddings" in z else "context" if "context" in z else None
      if key is None:
        raise UserError(f"{path} has no `embeddings` (or `context`) array; it holds {sorted(z.files)}.")
      emb = z[key]
      lengths = z["lengths"] if "lengths" in z else None
      prompts = [str(p) for p in np.atleast_1d(z["prompts"])] if "prompts" in z else None
  elif path.endswith(".npy"):
    emb = np.load(path)
  else:
    raise UserError(f"text embeddings {path}: use a .npz, a .npy or a folder of them.")
  emb = emb[None] if emb.ndim == 2 else emb
  if emb.ndim != 3:
    raise UserError(f"{path}: embeddings must be [N, tokens, dim] or [tokens, dim], got shape {emb.shape}.")
  if lengths is not None and np.shape(lengths) != (emb.shape[0],):
    raise UserError(f"{path}: lengths must be [N] = [{emb.shape[0]}], got shape {np.shape(lengths)}.")
  if prompts is not None and len(prompts) != emb.shape[0]:
    raise UserError(f"{path}: {len(prompts)} prompts for {emb.shape[0]} embeddings.")
  ctx = np.stack([_pad(e, None if lengths is None else int(lengths[i]), text_len, path) for i, e in enumerate(emb)])
  return prompts, ctx
