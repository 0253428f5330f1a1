"""Wan2.1 DiT checkpoints -> rcm-jax params: diffusers `WanTransformer3DModel` folders and the original layout.

Owns: reading safetensors (single file, a folder, or shards with an index json; bf16 included, memory-mapped,
no torch), the two key layouts (diffusers names, and the original Wan2.1 repo's names such as
`blocks.0.self_attn.q.weight` / `head.modulation`, optionally under `model.diffusion_model.`), their config
files -> `WanConfig`, the renaming and transposes into our param tree, and writing the result as an orbax
checkpoint that `training.checkpoint.load_params` (and so `init_from` / `sample.checkpoint`) reads:

    python -m rcm_jax.main convert --src DIR --dst DIR

Notes on the mapping (checked by tests/test_interop_wan.py against diffusers 0.42.1):
- diffusers' `WanAttention` always applies RMSNorm to q and k (its `qk_norm` config key is not read), so a
  diffusers folder always loads with `qk_norm=True`; in the original layout `qk_norm` follows its config.
- The original layout's `norm3` is the cross-attention norm (diffusers' and our `norm2`).
- `in_channels > out_channels` (channels concatenated to x, Wan i2v style) loads as
  `cond_channels = in_channels - out_channels`; pass them as the model's `y`.
- The i2v image branch (CLIP image embedding, `add_k_proj` / `k_img`) is not supported: such a checkpoint is
  refused with one error.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import struct

import jax
import numpy as np

from rcm_jax.errors import UserError
from rcm_jax.models.config import WanConfig
from rcm_jax.models.wan import WanModel, dummy_inputs

LAYOUTS = ("diffusers", "original")
ORIGINAL_PREFIX = "model.diffusion_model."
# Architecture fields of WanConfig that a checkpoint fixes (the rest are numerics / memory settings).
ARCH_FIELDS = ("dim", "num_heads", "num_layers", "ffn_dim", "in_channels", "cond_channels", "out_channels",
               "patch_size", "text_dim", "freq_dim", "cross_attn_norm", "qk_norm", "eps", "rope_theta",
               "rope_max_seq_len")
I2V_MESSAGE = ("this is an image-to-video Wan checkpoint (CLIP image embedding branch: {what}); rcm-jax supports "
               "text-to-video Wan2.1 DiTs only. Convert a T2V checkpoint (e.g. Wan2.1-T2V-1.3B or -14B).")


class CheckpointError(UserError):
  """A checkpoint that cannot be converted: missing / unknown keys, wrong shapes, unsupported variants."""


# ----------------------------------------------------------------------------- safetensors (no torch)

def _st_dtypes():
  import ml_dtypes
  return {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """name -> read-only memory-mapped array of one .safetensors file (format: u64 header size, JSON header, data)."""
  dtypes = _st_dtypes()
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise CheckpointError(f"{path} is not a safetensors file (shorter than its 8-byte header size).")
    (n,) = struct.unpack("<Q", raw)
    if n > size - 8:
      raise CheckpointError(f"{path} is not a safetensors file (header size {n} > file size {size}).")
    try:
      header = json.loads(f.read(n))
    except ValueError:
      raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON).") from None
  header.pop("__metadata__", None)
  data = np.memmap(path, np.uint8, "r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
  out = {}
  for name, info in header.items():
    if info["dtype"] not in dtypes:
      raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}, which rcm-jax cannot read.")
    start, end = info["data_offsets"]
    out[name] = data[start:end].view(dtypes[info["dtype"]]).reshape(info["shape"])
  return out


def safetensors_files(src: str) -> list[str]:
  """The .safetensors files of a checkpoint: a file, the shards an index json names, or every one in a folder."""
  if os.path.isfile(src):
    if src.endswith(".safetensors.index.json"):
      with open(src) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      return [os.path.join(os.path.dirname(src), s) for s in shards]
    if not src.endswith(".safetensors"):
      raise CheckpointError(f"--src {src}: rcm-jax reads .safetensors checkpoints only (no torch here); save the "
                            "state dict with safetensors.torch.save_file first.")
    return [src]
  if not os.path.isdir(src):
    raise CheckpointError(f"--src {src} does not exist.")
  index = sorted(glob.glob(os.path.join(src, "*.safetensors.index.json")))
  if len(index) > 1:
    raise CheckpointError(f"--src {src} holds several index files {[os.path.basename(i) for i in index]}; "
                          "point --src at one of them.")
  if index:
    files = safetensors_files(index[0])
    absent = [f for f in files if not os.path.exists(f)]
    if absent:
      raise CheckpointError(f"{index[0]} names shards that are missing: {[os.path.basename(f) for f in absent]}.")
    return files
  files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
  if not files:
    other = sorted(os.path.basename(f) for f in glob.glob(os.path.join(src, "*"))
                   if f.endswith((".pth", ".bin", ".pt")))
    hint = f" (found {other}: convert them to safetensors first, rcm-jax has no torch)" if other else ""
    raise CheckpointError(f"--src {src} holds no .safetensors file{hint}.")
  return files


def read_state_dict(src: str) -> dict[str, np.ndarray]:
  """Every tensor of a (possibly sharded) safetensors checkpoint, memory-mapped; duplicate names are an error."""
  out = {}
  for path in safetensors_files(src):
    part = read_safetensors(path)
    dup = sorted(set(part) & set(out))
    if dup:
      raise CheckpointError(f"tensors {dup[:5]} appear in more than one shard of {src}.")
    out.update(part)
  return out


# ----------------------------------------------------------------------------- key layouts

_ORIGINAL_RULES = [   # (original regex, diffusers replacement), applied to the whole key
    (r"time_embedding\.0\.(weight|bias)", r"condition_embedder.time_embedder.linear_1.\1"),
    (r"time_embedding\.2\.(weight|bias)", r"condition_embedder.time_embedder.linear_2.\1"),
    (r"time_projection\.1\.(weight|bias)", r"condition_embedder.time_proj.\1"),
    (r"text_embedding\.0\.(weight|bias)", r"condition_embedder.text_embedder.linear_1.\1"),
    (r"text_embedding\.2\.(weight|bias)", r"condition_embedder.text_embedder.linear_2.\1"),
    (r"patch_embedding\.(weight|bias)", r"patch_embedding.\1"),
    (r"head\.head\.(weight|bias)", r"proj_out.\1"),
    (r"head\.modulation", r"scale_shift_table"),
    (r"blocks\.(\d+)\.self_attn\.([qkv])\.(weight|bias)", r"blocks.\1.attn1.to_\2.\3"),
    (r"blocks\.(\d+)\.self_attn\.o\.(weight|bias)", r"blocks.\1.attn1.to_out.0.\2"),
    (r"blocks\.(\d+)\.self_attn\.norm_([qk])\.weight", r"blocks.\1.attn1.norm_\2.weight"),
    (r"blocks\.(\d+)\.cross_attn\.([qkv])\.(weight|bias)", r"blocks.\1.attn2.to_\2.\3"),
    (r"blocks\.(\d+)\.cross_attn\.o\.(weight|bias)", r"blocks.\1.attn2.to_out.0.\2"),
    (r"blocks\.(\d+)\.cross_attn\.norm_([qk])\.weight", r"blocks.\1.attn2.norm_\2.weight"),
    (r"blocks\.(\d+)\.norm3\.(weight|bias)", r"blocks.\1.norm2.\2"),     # the cross-attention norm
    (r"blocks\.(\d+)\.ffn\.0\.(weight|bias)", r"blocks.\1.ffn.net.0.proj.\2"),
    (r"blocks\.(\d+)\.ffn\.2\.(weight|bias)", r"blocks.\1.ffn.net.2.\2"),
    (r"blocks\.(\d+)\.modulation", r"blocks.\1.scale_shift_table"),
]
_ORIGINAL_RULES = [(re.compile(a + r"\Z"), b) for a, b in _ORIGINAL_RULES]
_I2V_ORIGINAL = re.compile(r"(img_emb\.|\.k_img\.|\.v_img\.|\.norm_k_img\.)")
_I2V_DIFFUSERS = re.compile(r"(image_embedder\.|\.add_k_proj\.|\.add_v_proj\.|\.norm_added_k\.)")


def original_to_diffusers_key(key: str) -> str | None:
  """An original Wan2.1 key (prefix stripped) -> its diffusers name, or None if it is not a Wan2.1 T2V key."""
  for pattern, repl in _ORIGINAL_RULES:
    if pattern.match(key):
      return pattern.sub(repl, key)
  return None


def detect_layout(keys) -> str:
  keys = set(keys)
  if any(k.startswith(ORIGINAL_PREFIX) for k in keys) or "head.modulation" in keys:
    return "original"
  if "condition_embedder.time_proj.weight" in keys or "proj_out.weight" in keys:
    return "diffusers"
  raise CheckpointError(f"cannot tell the layout of this checkpoint: it has neither `head.modulation` (original "
                        f"Wan2.1) nor `proj_out.weight` (diffusers); first keys: {sorted(keys)[:8]}.")


def our_path_to_diffusers_key(path: tuple[str, ...]) -> str:
  """('blocks_3', 'attn1', 'to_out_0', 'kernel') -> 'blocks.3.attn1.to_out.0.weight'."""
  parts = []
  for name in path[:-1]:
    m = re.fullmatch(r"(blocks|to_out|net)_(\d+)", name)
    parts.extend([m.group(1), m.group(2)] if m else [name])
  leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
  return ".".join(parts + [leaf])


def to_ours(array: np.ndarray, leaf: str) -> np.ndarray:
  """A torch-layout tensor -> our layout: Linear [out, in] -> [in, out], Conv3d [O, I, t, h, w] -> [t, h, w, I, O]."""
  if leaf == "kernel":
    return array.transpose(2, 3, 4, 1, 0) if array.ndim == 5 else array.T
  return array


def torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  """Our param shape -> the shape the same tensor has in a torch state dict."""
  if leaf == "kernel":
    return (shape[4], shape[3], *shape[:3]) if len(shape) == 5 else tuple(shape[::-1])
  return tuple(shape)


# ----------------------------------------------------------------------------- configs

def _bad_config(src, key, msg):
  raise CheckpointError(f"{src}: config key {key!r}: {msg}")


def _make_config(src: str, **fields) -> WanConfig:
  if fields["in_channels"] < fields["out_channels"]:
    _bad_config(src, "in_channels", f"{fields['in_channels']} < out_channels {fields['out_channels']}; rcm-jax "
                "reads extra input channels as concatenated conditioning (cond_channels) only.")
  fields["cond_channels"] = fields["in_channels"] - fields["out_channels"]
  fields["in_channels"] = fields["out_channels"]
  fields["patch_size"] = tuple(int(p) for p in fields["patch_size"])
  try:
    return WanConfig(**fields)
  except ValueError as e:
    raise CheckpointError(f"{src}: the checkpoint's config does not make a valid rcm-jax WanConfig: {e}") from None


def config_from_diffusers(cfg: dict, src: str = "config.json") -> WanConfig:
  """diffusers `WanTransformer3DModel` config.json -> WanConfig (see the module docstring for qk_norm)."""
  for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
    if cfg.get(key) is not None:
      raise CheckpointError(f"{src}: " + I2V_MESSAGE.format(what=f"config {key}={cfg[key]}"))
  heads, head_dim = cfg.get("num_attention_heads", 40), cfg.get("attention_head_dim", 128)
  in_channels = cfg.get("in_channels", 16)
  return _make_config(
      src, dim=heads * head_dim, num_heads=heads, num_layers=cfg.get("num_layers", 40),
      ffn_dim=cfg.get("ffn_dim", 13824), in_channels=in_channels, out_channels=cfg.get("out_channels") or in_channels,
      patch_size=cfg.get("patch_size", (1, 2, 2)), text_dim=cfg.get("text_dim", 4096),
      freq_dim=cfg.get("freq_dim", 256), cross_attn_norm=bool(cfg.get("cross_attn_norm", True)), qk_norm=True,
      eps=float(cfg.get("eps", 1e-6)), rope_max_seq_len=cfg.get("rope_max_seq_len", 1024))


def config_from_original(cfg: dict, src: str = "config.json") -> WanConfig:
  """The original Wan2.1 `WanModel` config.json (keys dim, in_dim, out_dim, num_heads, ...) -> WanConfig."""
  model_type = cfg.get("model_type", "t2v")
  if model_type != "t2v":
    if model_type in ("i2v", "flf2v"):
      raise CheckpointError(f"{src}: " + I2V_MESSAGE.format(what=f"model_type={model_type!r}"))
    _bad_config(src, "model_type", f"{model_type!r} is not supported; rcm-jax converts Wan2.1 't2v' DiTs.")
  if tuple(cfg.get("window_size", (-1, -1))) != (-1, -1):
    _bad_config(src, "window_size", f"{cfg['window_size']}: local attention windows are not supported (Wan2.1 "
                "uses (-1, -1), global attention).")
  return _make_config(
      src, dim=cfg.get("dim", 2048), num_heads=cfg.get("num_heads", 16), num_layers=cfg.get("num_layers", 32),
      ffn_dim=cfg.get("ffn_dim", 8192), in_channels=cfg.get("in_dim", 16), out_channels=cfg.get("out_dim", 16),
      patch_size=cfg.get("patch_size", (1, 2, 2)), text_dim=cfg.get("text_dim", 4096),
      freq_dim=cfg.get("freq_dim", 256), cross_attn_norm=bool(cfg.get("cross_attn_norm", True)),
      qk_norm=bool(cfg.get("qk_norm", True)), eps=float(cfg.get("eps", 1e-6)))


WAN_HEAD_DIM = 128   # every Wan2.1 DiT: 1.3B = 12 x 128, 14B = 40 x 128


def config_from_weights(sd: dict[str, np.ndarray], src: str) -> WanConfig:
  """WanConfig from diffusers-named tensor shapes alone (no config.json): head_dim is assumed to be Wan's 128."""
  def shape(key):
    if key not in sd:
      raise CheckpointError(f"{src} has no config.json and lacks {key!r}, so its config cannot be inferred; "
                            "add the model's config.json.")
    return sd[key].shape
  dim, in_ch, *patch = shape("patch_embedding.weight")
  if dim % WAN_HEAD_DIM:
    raise CheckpointError(f"{src} has no config.json and its width {dim} is not a multiple of Wan's head_dim "
                          f"{WAN_HEAD_DIM}; add the model's config.json (num_heads).")
  layers = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
  return _make_config(
      src, dim=dim, num_heads=dim // WAN_HEAD_DIM, num_layers=layers,
      ffn_dim=shape("blocks.0.ffn.net.0.proj.weight")[0], in_channels=in_ch,
      out_channels=shape("proj_out.weight")[0] // math.prod(patch), patch_size=patch,
      text_dim=shape("condition_embedder.text_embedder.linear_1.weight")[1],
      freq_dim=shape("condition_embedder.time_embedder.linear_1.weight")[1],
      cross_attn_norm="blocks.0.norm2.weight" in sd, qk_norm="blocks.0.attn1.norm_q.weight" in sd, eps=1e-6)


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _config_dir(src: str) -> str:
  return src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))


# ----------------------------------------------------------------------------- loading

def expected_shapes(config: WanConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Our param path -> shape for `config` with per-layer blocks (shape-only, nothing allocated)."""
  config = config.replace(scan_layers=False)
  args, kwargs = dummy_inputs(config)
  tree = jax.eval_shape(lambda: WanModel(config).init(jax.random.key(0), *args, **kwargs)["params"])
  return {tuple(k.key for k in path): tuple(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def resolve_source(src: str) -> str:
  """A diffusers pipeline folder (with transformer/) -> its transformer folder; anything else unchanged."""
  sub = os.path.join(src, "transformer")
  if os.path.isdir(src) and not glob.glob(os.path.join(src, "*.safetensors*")) and os.path.isdir(sub):
    return sub
  return src


def load_state_dict(src: str) -> tuple[dict[str, np.ndarray], WanConfig, str]:
  """(diffusers-named torch-layout tensors, WanConfig, layout) of a checkpoint in either layout."""
  src = resolve_source(src)
  sd = read_state_dict(src)
  layout = detect_layout(sd)
  cfg_path = os.path.join(_config_dir(src), "config.json")
  cfg = _read_json(cfg_path) if os.path.exists(cfg_path) else None
  if layout == "original":
    sd = {k[len(ORIGINAL_PREFIX):] if k.startswith(ORIGINAL_PREFIX) else k: v for k, v in sd.items()}
    i2v = sorted(k for k in sd if _I2V_ORIGINAL.search(k))
    if i2v:
      raise CheckpointError(f"{src}: " + I2V_MESSAGE.format(what=f"tensors {i2v[:3]}"))
    renamed, unknown = {}, []
    for k, v in sd.items():
      new = original_to_diffusers_key(k)
      if new is None:
        unknown.append(k)
      else:
        renamed[new] = v
    if unknown:
      raise CheckpointError(f"{src}: unknown keys for an original-layout Wan2.1 T2V checkpoint ({len(unknown)}): "
                            f"{sorted(unknown)}.")
    sd = renamed
    config = config_from_original(cfg, cfg_path) if cfg is not None else config_from_weights(sd, src)
  else:
    i2v = sorted(k for k in sd if _I2V_DIFFUSERS.search(k))
    if i2v:
      raise CheckpointError(f"{src}: " + I2V_MESSAGE.format(what=f"tensors {i2v[:3]}"))
    if cfg is not None and cfg.get("_class_name", "WanTransformer3DModel") != "WanTransformer3DModel":
      raise CheckpointError(f"{cfg_path}: _class_name is {cfg['_class_name']!r}; rcm-jax converts "
                            "WanTransformer3DModel (diffusers) or WanModel (original Wan2.1) checkpoints.")
    config = config_from_diffusers(cfg, cfg_path) if cfg is not None else config_from_weights(sd, src)
  return sd, config, layout


def params_from_state_dict(sd: dict[str, np.ndarray], config: WanConfig, src: str = "checkpoint") -> dict:
  """Diffusers-named torch-layout tensors -> our fp32 param tree (per-layer blocks).

  Every tensor must be used and every param found: one error lists all missing and unknown keys, a shape
  mismatch names the key and both shapes (in the checkpoint's torch layout).
  """
  want = expected_shapes(config)
  by_key = {our_path_to_diffusers_key(p): p for p in want}
  missing, unknown = sorted(set(by_key) - set(sd)), sorted(set(sd) - set(by_key))
  if missing or unknown:
    raise CheckpointError(
        f"{src} does not match the Wan DiT its config describes ({config.num_layers} layers, dim {config.dim}, "
        f"cross_attn_norm={config.cross_attn_norm}, qk_norm={config.qk_norm}): missing keys ({len(missing)}) "
        f"{missing}; unknown keys ({len(unknown)}) {unknown}.")
  bad = []
  for key, path in by_key.items():
    got, need = tuple(sd[key].shape), torch_shape(want[path], path[-1])
    if got != need:
      bad.append(f"{key}: checkpoint {got}, model expects {need}")
  if bad:
    raise CheckpointError(f"{src}: shape mismatch for {len(bad)} key(s): " + "; ".join(bad) + ".")
  params = {}
  for key, path in by_key.items():
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.ascontiguousarray(to_ours(np.asarray(sd[key], np.float32), path[-1]))
  return params


def load(src: str) -> tuple[WanConfig, dict]:
  """(WanConfig, fp32 param tree with per-layer blocks) of a diffusers folder or an original Wan2.1 checkpoint."""
  sd, config, _ = load_state_dict(src)
  return config, params_from_state_dict(sd, config, src)


def config_fields(config: WanConfig) -> dict:
  """The architecture fields of a WanConfig, JSON-ready (what config.model must repeat to use the checkpoint)."""
  d = dataclasses.asdict(config)
  return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in ARCH_FIELDS}


def convert(src: str, dst: str, *, scan_layers: bool = False) -> dict:
  """Convert a checkpoint to an orbax checkpoint at `<dst>/ckpt` (step 0) plus `<dst>/convert.json`.

  `training.checkpoint.load_params(dst)` returns the model variables `{"params": tree}`, like a trained stage's,
  so `init_from=<dst>` and `checkpoint=<dst>` work for any config whose model matches `convert.json`'s.

  `dst` must not exist or be empty: nothing is overwritten. scan_layers=True stacks the blocks for configs
  with model.scan_layers=True. Returns what convert.json holds.
  """
  from rcm_jax.models.wan import loop_to_scan_params
  from rcm_jax.training import checkpoint

  if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
    raise CheckpointError(f"--dst {dst} exists and is not empty; pick a new directory (nothing is overwritten).")
  sd, config, layout = load_state_dict(src)
  params = params_from_state_dict(sd, config, src)
  if scan_layers:
    params = jax.tree.map(np.asarray, loop_to_scan_params(params, config.num_layers))
  os.makedirs(dst, exist_ok=True)
  mngr = checkpoint.manager(os.path.join(dst, "ckpt"), keep=1, save_every=1)
  # As the trainer stores them: state "params" = the model's variables {"params": tree}.
  checkpoint.save(mngr, 0, {"params": {"params": params}}, force=True)
  mngr.wait_until_finished()
  mngr.close()
  info = {"source": os.path.abspath(src), "layout": layout, "scan_layers": scan_layers,
          "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
          "model": config_fields(config)}
  with open(os.path.join(dst, "convert.json"), "w") as f:
    json.dump(info, f, indent=2)
  return info
