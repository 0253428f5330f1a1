"""Wan2.1 interop: DiT checkpoints (diffusers and original layout) and the umT5 text encoder vs the torch references.

The reference models are built, saved and run by tests/ref/{dit_ref,umt5_ref}.py under .venv-ref (one subprocess
per module-scoped fixture). Outputs are compared with the reference run in float64: our float32 error must be
of the size of torch's own float32 error (float32 rounding), not of a wrong layout.
"""
import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from rcm_jax.errors import UserError
from rcm_jax.interop import umt5, wan
from rcm_jax.models import WanModel, get_config
from rcm_jax.models.wan import dummy_inputs
from rcm_jax.training import checkpoint
from rcm_jax.training.setup import check_params_match

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_ref(ref_python, script, out):
  proc = subprocess.run([ref_python, os.path.join(ROOT, "tests", "ref", script), str(out)], capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


@pytest.fixture(scope="module")
def dit_ref(ref_python, tmp_path_factory):
  return _run_ref(ref_python, "dit_ref.py", tmp_path_factory.mktemp("dit_ref"))


@pytest.fixture(scope="module")
def umt5_ref(ref_python, tmp_path_factory):
  return _run_ref(ref_python, "umt5_ref.py", tmp_path_factory.mktemp("umt5_ref"))


def _assert_fp32_close(ours, ref32, ref64, what):
  """ours (float32) within a few times torch's float32 error of the float64 reference."""
  scale = np.abs(ref64).max()
  err_torch = np.abs(ref32 - ref64).max()
  err = np.abs(np.asarray(ours, np.float64) - ref64).max()
  assert err <= 4 * max(err_torch, 1e-7 * scale), f"{what}: max abs err {err:.3g} vs torch fp32 {err_torch:.3g}"


# ----------------------------------------------------------------------------- DiT

@functools.lru_cache
def _forward(cfg):   # one compile per config and input shapes, shared by both layouts
  return jax.jit(lambda p, x, t, ctx, y: WanModel(cfg).apply({"params": p}, x, t, context=ctx, y=y))


@pytest.mark.parametrize("layout", ["diffusers", "original"])
@pytest.mark.parametrize("case", ["t2v", "no_xnorm_pt2", "cond_channels"])
def test_dit_matches_diffusers(dit_ref, case, layout):
  """Per-sample [B] and per-frame [B, F] times (diffusers: per-token timesteps), every switch, both layouts."""
  io = np.load(dit_ref / case / "io.npz")
  cfg, params = wan.load(str(dit_ref / case / layout))
  want = {"t2v": dict(cross_attn_norm=True, patch_size=(1, 2, 2), cond_channels=0, eps=1e-6),
          "no_xnorm_pt2": dict(cross_attn_norm=False, patch_size=(2, 2, 2), cond_channels=0, eps=1e-5),
          "cond_channels": dict(cross_attn_norm=True, patch_size=(1, 2, 2), cond_channels=2, eps=1e-6)}[case]
  assert {k: getattr(cfg, k) for k in want} == want and cfg.qk_norm and cfg.dim == 48 and cfg.num_heads == 2
  x = io["x"].transpose(0, 2, 3, 4, 1)                                   # [B, C, T, H, W] -> [B, T, H, W, C]
  x, y = (x[..., :cfg.in_channels], x[..., cfg.in_channels:]) if cfg.cond_channels else (x, None)
  for kind in ("sample", "frame"):
    out = np.asarray(_forward(cfg)(params, x, io["t_" + kind], io["context"], y)).transpose(0, 4, 1, 2, 3)
    _assert_fp32_close(out, io[f"out_{kind}_32"], io[f"out_{kind}_64"], f"{case}/{layout}/{kind}")


def test_both_layouts_give_the_same_params(dit_ref):
  for case in ("t2v", "no_xnorm_pt2"):   # single file / sharded + index json; plain / model.diffusion_model.
    a, b = wan.load(str(dit_ref / case / "diffusers")), wan.load(str(dit_ref / case / "original"))
    assert a[0] == b[0]
    jax.tree.map(np.testing.assert_array_equal, a[1], b[1])


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_i2v_checkpoint_refused(dit_ref, layout):
  with pytest.raises(wan.CheckpointError, match="image-to-video"):
    wan.load(str(dit_ref / "i2v" / layout))


def test_bad_state_dicts_name_keys_and_shapes(dit_ref):
  sd, cfg, _ = wan.load_state_dict(str(dit_ref / "t2v" / "diffusers"))
  sd = {k: np.asarray(v) for k, v in sd.items()}
  bad = dict(sd)
  del bad["blocks.1.attn2.to_k.bias"], bad["proj_out.weight"]
  bad["blocks.0.attn1.to_qkv.weight"] = np.zeros(3)
  with pytest.raises(wan.CheckpointError) as e:
    wan.params_from_state_dict(bad, cfg, "ckpt")
  msg = str(e.value)   # one error with every missing and every unknown key
  assert "blocks.1.attn2.to_k.bias" in msg and "proj_out.weight" in msg and "blocks.0.attn1.to_qkv.weight" in msg
  bad = dict(sd, **{"blocks.0.ffn.net.0.proj.weight": np.zeros((65, 48), np.float32)})
  with pytest.raises(wan.CheckpointError, match=r"blocks\.0\.ffn\.net\.0\.proj\.weight: checkpoint \(65, 48\), "
                     r"model expects \(64, 48\)"):
    wan.params_from_state_dict(bad, cfg, "ckpt")
  assert wan.original_to_diffusers_key("no_such_module.weight") is None
  with pytest.raises(wan.CheckpointError, match=r"unknown keys .*\['no_such_module\.weight'\]"):   # original layout
    wan.load_state_dict(_with_extra_key(dit_ref))


def _with_extra_key(dit_ref):
  """An original-layout copy of the t2v case with one extra tensor (written with our own safetensors writer)."""
  src = dit_ref / "t2v" / "original"
  dst = dit_ref / "t2v_extra_key"
  if not dst.exists():
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    sd = {k: np.asarray(v) for k, v in wan.read_safetensors(str(src / "diffusion_pytorch_model.safetensors")).items()}
    sd["no_such_module.weight"] = np.ones(3, np.float32)
    _write_safetensors(dst / "model.safetensors", sd)
  return str(dst)


def _write_safetensors(path, tensors):
  header, blobs, offset = {}, [], 0
  for k, v in tensors.items():
    b = np.ascontiguousarray(v, np.float32).tobytes()
    header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, offset + len(b)]}
    blobs.append(b)
    offset += len(b)
  h = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def test_original_layout_without_qk_norm(dit_ref, tmp_path):
  """Original Wan configs with qk_norm=false have no norm_q / norm_k tensors (diffusers always has them)."""
  src = dit_ref / "t2v" / "original"
  sd = {k: np.asarray(v) for k, v in wan.read_safetensors(str(src / "diffusion_pytorch_model.safetensors")).items()
        if ".norm_q." not in k and ".norm_k." not in k}
  _write_safetensors(tmp_path / "model.safetensors", sd)
  cfg = json.loads((src / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(cfg, qk_norm=False)))
  config, params = wan.load(str(tmp_path))
  assert not config.qk_norm and "norm_q" not in params["blocks_0"]["attn1"]
  (tmp_path / "config.json").write_text(json.dumps(cfg))   # the config says qk_norm: the tensors are missing
  with pytest.raises(wan.CheckpointError, match=r"missing keys \(8\)"):
    wan.load(str(tmp_path))


def test_safetensors_reader_bf16_and_errors(tmp_path):
  import ml_dtypes
  a = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
  path = tmp_path / "x.safetensors"
  h = json.dumps({"a": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}).encode()
  path.write_bytes(len(h).to_bytes(8, "little") + h + a.astype(ml_dtypes.bfloat16).tobytes())
  np.testing.assert_array_equal(np.asarray(wan.read_safetensors(str(path))["a"], np.float32),
                                a.astype(ml_dtypes.bfloat16).astype(np.float32))
  (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 20)
  with pytest.raises(wan.CheckpointError, match="not a safetensors file"):
    wan.read_safetensors(str(tmp_path / "junk.safetensors"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(wan.CheckpointError, match="no .safetensors"):
    wan.read_state_dict(str(tmp_path / "empty"))


def test_config_inferred_from_weights_without_config_json():
  """No config.json: every field from tensor shapes, num_heads from Wan's head_dim 128."""
  cfg = get_config("tiny", dim=256, num_heads=2, num_layers=3, ffn_dim=40, text_dim=24, freq_dim=32,
                   in_channels=4, out_channels=4, cross_attn_norm=False)
  sd = {wan.our_path_to_diffusers_key(p): np.zeros(wan.torch_shape(s, p[-1]), np.float32)
        for p, s in wan.expected_shapes(cfg).items()}
  assert wan.config_from_weights(sd, "ckpt") == cfg
  small = {k: v for k, v in sd.items()}
  small["patch_embedding.weight"] = np.zeros((48, 4, 1, 2, 2), np.float32)
  with pytest.raises(wan.CheckpointError, match="num_heads"):
    wan.config_from_weights(small, "ckpt")


def test_convert_cli_writes_a_checkpoint_load_params_reads(dit_ref, tmp_path):
  dst = tmp_path / "converted"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "rcm_jax.main", "convert", f"--src={dit_ref / 't2v' / 'diffusers'}", f"--dst={dst}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  variables, step = checkpoint.load_params(str(dst))
  assert step == 0
  cfg, want = wan.load(str(dit_ref / "t2v" / "diffusers"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), variables["params"], want)
  # what `init_from` checks: the variables of this config's model, tree and shapes
  model_cfg = get_config("tiny", **{k: tuple(v) if k == "patch_size" else v for k, v in
                                    json.loads((dst / "convert.json").read_text())["model"].items()})
  args, kwargs = dummy_inputs(model_cfg)
  check_params_match(variables, jax.eval_shape(lambda: WanModel(model_cfg).init(jax.random.key(0), *args,
                                                                                  **kwargs)), str(dst))
  info = json.loads((dst / "convert.json").read_text())
  assert info["layout"] == "diffusers" and info["model"]["dim"] == 48
  assert info["num_params"] == sum(x.size for x in jax.tree.leaves(want))
  # a bad source is one clean line, not a traceback; a second convert never overwrites
  proc = subprocess.run(cmd[:4] + [f"--src={dit_ref / 'i2v' / 'diffusers'}", f"--dst={tmp_path / 'i2v'}"],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert proc.returncode != 0 and "image-to-video" in proc.stderr and "Traceback" not in proc.stderr
  with pytest.raises(wan.CheckpointError, match="not empty"):
    wan.convert(str(dit_ref / "t2v" / "diffusers"), str(dst))
  # scanned blocks for model.scan_layers=True configs
  wan.convert(str(dit_ref / "t2v" / "original"), str(tmp_path / "scanned"), scan_layers=True)
  scanned, _ = checkpoint.load_params(str(tmp_path / "scanned"))
  assert scanned["params"]["blocks"]["attn1"]["to_q"]["kernel"].shape == (2, 48, 48)


def test_convert_flags_are_checked():
  proc = subprocess.run([sys.executable, "-m", "rcm_jax.main", "convert", "--src=x", "--workdir=y"],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode != 0 and "--dst" in proc.stderr and "--workdir" in proc.stderr


# ----------------------------------------------------------------------------- umT5

def test_umt5_tokenizer_matches_transformers(umt5_ref):
  io = np.load(umt5_ref / "io.npz")
  tok = umt5.Tokenizer(str(umt5_ref / "umt5"))
  ids, mask = tok([str(p) for p in io["prompts"]], io["input_ids"].shape[1])
  np.testing.assert_array_equal(ids, io["input_ids"])       # incl. truncation keeping </s>, unknown chars
  np.testing.assert_array_equal(mask, io["mask"])
  assert io["mask"][1].all() and io["input_ids"][1, -1] == 1  # the long prompt was truncated


def test_umt5_relative_buckets_match_transformers(umt5_ref):
  io = np.load(umt5_ref / "io.npz")
  np.testing.assert_array_equal(umt5.relative_position_buckets(300, 32, 128), io["buckets_300"])


def test_umt5_encoder_matches_transformers(umt5_ref):
  io = np.load(umt5_ref / "io.npz")
  cfg, params = umt5.load_encoder(str(umt5_ref / "umt5"))
  assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_kv) == (32, 2, 4, 8)
  out = jax.jit(lambda p: umt5.UMT5Encoder(cfg).apply({"params": p}, io["input_ids"], io["mask"]))(params)
  _assert_fp32_close(out, io["out_32"], io["out_64"], "umt5")
  # the whole text path (clean-up, tokenizer, encoder, Wan's zeroing past each prompt's length)
  enc = umt5.load_text_encoder(str(umt5_ref / "umt5"), text_len=io["input_ids"].shape[1])
  ctx, lengths = enc.encode([str(p) for p in io["prompts"]], batch_size=3)
  np.testing.assert_array_equal(lengths, io["mask"].sum(1))
  want = io["out_64"] * io["mask"][..., None]
  assert np.abs(ctx - want).max() <= 4 * max(np.abs(io["out_32"] - io["out_64"]).max(), 1e-7)
  assert not ctx[0, lengths[0]:].any()


def test_umt5_bad_checkpoint(umt5_ref, tmp_path):
  bad = tmp_path / "bad"
  shutil.copytree(umt5_ref / "umt5", bad)
  cfg = json.loads((bad / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps(dict(cfg, num_layers=3)))
  with pytest.raises(wan.CheckpointError, match=r"missing keys \(\d+\) \['encoder\.block\.2\."):
    umt5.load_encoder(str(bad))
  (bad / "config.json").write_text(json.dumps(dict(cfg, feed_forward_proj="relu")))
  with pytest.raises(wan.CheckpointError, match="gated-gelu"):
    umt5.load_encoder(str(bad))
  with pytest.raises(UserError, match="tokenizer.json"):
    umt5.Tokenizer(str(tmp_path))


def test_cached_text_embeddings_roundtrip(tmp_path):
  rng = np.random.default_rng(0)
  ctx = rng.standard_normal((3, 10, 8)).astype(np.float32)
  lengths = np.array([4, 10, 1])
  ctx[np.arange(10)[None, :] >= lengths[:, None]] = 0
  path = umt5.save_text_embeddings(str(tmp_path / "emb.npz"), ["a", "b", "c"], ctx, lengths)
  prompts, got = umt5.load_text_embeddings(path, text_len=16)
  assert prompts == ["a", "b", "c"] and got.shape == (3, 16, 8)
  np.testing.assert_array_equal(got[:, :10], ctx)
  assert not got[:, 10:].any()
  folder = tmp_path / "per_prompt"   # one .npy per prompt, trimmed to its length
  folder.mkdir()
  for i, name in enumerate(["p0", "p1", "p2"]):
    np.save(folder / f"{name}.npy", ctx[i, :lengths[i]])
  prompts, got2 = umt5.load_text_embeddings(str(folder), text_len=16)
  assert prompts == ["p0", "p1", "p2"]
  np.testing.assert_array_equal(got2, got)
  np.save(tmp_path / "long.npy", np.zeros((20, 8), np.float32))
  with pytest.raises(UserError, match="text_len 16"):
    umt5.load_text_embeddings(str(tmp_path / "long.npy"), text_len=16)


# ----------------------------------------------------------------------------- T2V pipeline

def _t2v_config(arg=None, **overrides):
  import importlib.util
  spec = importlib.util.spec_from_file_location("t2v_1p3b", os.path.join(ROOT, "configs", "wan2p1", "t2v_1p3b.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config(arg)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _read_mp4(path):
  import imageio.v3 as iio
  return iio.imread(path)


def test_t2v_1p3b_config_is_wan2p1_1p3b():
  """The T2V config's DiT is Wan2.1-1.3B (tests/test_models.py ties count_params("wan_1p3b") to its 1.42B)."""
  from rcm_jax.interop import t2v
  from rcm_jax.models import SIZES, count_params
  model_cfg = t2v.make_model(_t2v_config(**{"model.attention_impl": "xla"})).config   # cudnn: GPU only
  assert {k: getattr(model_cfg, k) for k in wan.ARCH_FIELDS} == {k: getattr(SIZES["wan_1p3b"], k)
                                                                 for k in wan.ARCH_FIELDS}
  assert count_params(model_cfg) == 1_418_996_800


def test_t2v_tiny_random_weights_runs(tmp_path):
  """`sample --config=configs/wan2p1/t2v_1p3b.py:tiny` through jobs.sample: text -> DiT with CFG -> VAE -> mp4."""
  from rcm_jax.training import jobs
  result = jobs.sample(_t2v_config("tiny"), str(tmp_path))
  assert len(result["videos"]) == 2 and result["prompts"] == ["a red ball", "two cats"]
  frames = [_read_mp4(f) for f in result["videos"]]
  assert frames[0].shape == (5, 32, 32, 3)
  latents = np.load(tmp_path / "samples" / "latents.npz")["latents"]
  assert latents.shape == (2, 2, 4, 4, 4) and np.isfinite(latents).all()
  assert np.abs(latents[0] - latents[1]).max() > 1e-3   # different prompts and noise, different latents
  assert json.loads((tmp_path / "metrics.json").read_text())["videos"] == result["videos"]


def _vae_folder(path):
  """A diffusers-format AutoencoderKLWan folder of the tiny random VAE (our writer; A2's inverse key mapping)."""
  from rcm_jax.interop import wan_vae
  cfg = wan_vae.TINY
  path.mkdir()
  _write_safetensors(path / "diffusion_pytorch_model.safetensors",
                     wan_vae.to_diffusers_state_dict(wan_vae.init_params(0, cfg)))
  fields = {k: list(v) if isinstance(v, tuple) else v for k, v in
            ((k, getattr(cfg, k)) for k in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales",
                                            "temperal_downsample", "latents_mean", "latents_std"))}
  (path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", **fields}))
  return str(path)


def test_t2v_from_converted_checkpoints(dit_ref, umt5_ref, tmp_path):
  """The user's path: a converted DiT, a UMT5EncoderModel folder with its tokenizer, a diffusers VAE folder."""
  from rcm_jax.interop import t2v
  ckpt = tmp_path / "dit"
  info = wan.convert(str(dit_ref / "t2v" / "original"), str(ckpt))
  model = {k: tuple(v) if k == "patch_size" else v for k, v in info["model"].items()}
  config = _t2v_config(checkpoint=str(ckpt), vae=_vae_folder(tmp_path / "vae"), **{
      "text.encoder": str(umt5_ref / "umt5"), "text.dtype": "float32", "text.text_len": 16,
      "model.size": "tiny", "model.dtype": "float32", "model.attention_impl": "xla", "sample.steps": 2,
      "sample.frames": 5, "sample.height": 32, "sample.width": 32, "sample.prompts": ("a cat runs on the grass",),
      "sample.negative_prompt": "the dog"})
  for k, v in model.items():
    config.model[k] = v
  result = t2v.sample(config, str(tmp_path / "run"))
  assert _read_mp4(result["videos"][0]).shape == (5, 32, 32, 3)
  # a model that does not match the checkpoint, and a missing key, are one clean error each
  config.model.ffn_dim = 96
  with pytest.raises(UserError, match="config.checkpoint.*ffn"):
    t2v.sample(config, str(tmp_path / "run2"))
  with pytest.raises(UserError, match="config.vae"):
    t2v.sample(_t2v_config(checkpoint=str(ckpt)), str(tmp_path / "run3"))
