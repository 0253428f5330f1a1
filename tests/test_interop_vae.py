"""Wan2.1 VAE (rcm_jax.interop.wan_vae): parity with diffusers' AutoencoderKLWan, the loader's checks, numerics.

The parity tests run tests/ref/vae_ref.py under `.venv-ref` (fixture `ref_python`): it builds a small random
AutoencoderKLWan (Wan2.1 structure: 4 stages, 2 temporal down-samplings, 2 residual blocks per stage; base_dim 8,
z_dim 4), saves it, encodes a random 9-frame clip and decodes 3 random latent frames through diffusers' chunked,
cached passes. We load the folder and must match in both our modes (chunked scan with the cache, whole clip).
"""
import functools
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from rcm_jax.errors import UserError
from rcm_jax.interop import wan_vae as V

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF_CONFIG = {"base_dim": 8, "z_dim": 4, "num_res_blocks": 2, "latents_mean": [0.4, -0.3, 0.2, -0.1],
              "latents_std": [1.7, 0.6, 2.2, 1.1]}
# Other config switches, covered once (whole-clip only): a decoder width of its own, one residual block per stage.
# (attn_scales is refused: diffusers 0.42.1 itself fails with a non-empty one.)
SWITCHES_CONFIG = {"base_dim": 8, "decoder_base_dim": 12, "z_dim": 4, "num_res_blocks": 1,
                   "latents_mean": [0.0, 0.5, -0.5, 1.0], "latents_std": [1.0, 2.0, 0.5, 1.5]}
CASES = [{"name": "wan", "kwargs": REF_CONFIG, "video": [2, 9, 16, 24], "latent_frames": 3, "seed": 3},
         {"name": "switches", "kwargs": SWITCHES_CONFIG, "video": [1, 5, 16, 16], "latent_frames": 2, "seed": 4}]
# float32 rounding through ~40 conv layers: measured max errors 4e-7 (encode) and 4e-6 (decode) on values of
# order 1; a wrong mapping or cache gives errors of order 0.1.
ENC_TOL, DEC_TOL = 1e-5, 5e-5


@pytest.fixture(scope="module")
def refs(ref_python, tmp_path_factory):
  out = tmp_path_factory.mktemp("vae_ref")
  cmd = [ref_python, os.path.join(ROOT, "tests", "ref", "vae_ref.py"), str(out), json.dumps(CASES)]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  return {c["name"]: (str(out / c["name"]), dict(np.load(out / c["name"] / "ref.npz"))) for c in CASES}, str(out)


@pytest.fixture(scope="module")
def ref(refs):
  return refs[0]["wan"]


@pytest.fixture(scope="module")
def loaded(ref):
  folder, _ = ref
  return V.load_vae(os.path.join(folder, "vae"))


def _err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_config_from_folder(ref, loaded):
  cfg, _ = loaded
  assert (cfg.base_dim, cfg.z_dim, cfg.num_res_blocks, cfg.dim_mult) == (8, 4, 2, (1, 2, 4, 4))
  assert cfg.latents_mean == tuple(REF_CONFIG["latents_mean"]) and cfg.latents_std == tuple(REF_CONFIG["latents_std"])
  # the pipeline folder layout (<root>/vae/) loads too
  cfg2, _ = V.load_vae(ref[0])
  assert cfg2 == cfg


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole_clip"])
def test_encode_matches_diffusers(ref, loaded, chunked):
  _, r = ref
  cfg, params = loaded
  # one jit for both entry points (XLA merges the common graph: one compile)
  (mean, logvar), latents = jax.jit(lambda p, x: (V.encode_moments(p, x, config=cfg, chunked=chunked),
                                                  V.encode(p, x, config=cfg, chunked=chunked)))(params, r["video"])
  assert mean.shape == r["mean"].shape == (2, 3, 2, 3, 4)
  assert _err(mean, r["mean"]) < ENC_TOL and _err(mean, r["mode"]) < ENC_TOL
  assert _err(logvar, r["logvar"]) < ENC_TOL
  assert _err(latents, r["normalized"]) < ENC_TOL
  # the normalisation is not the identity here (guards against comparing raw with raw)
  assert _err(r["normalized"], r["mode"]) > 0.1


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole_clip"])
def test_decode_matches_diffusers(ref, loaded, chunked):
  _, r = ref
  cfg, params = loaded
  video = V.decode_jit(params, r["latents"], config=cfg, chunked=chunked)
  assert video.shape == r["decoded"].shape == (2, 9, 16, 24, 3)
  assert np.mean(np.abs(r["decoded"]) < 1) > 0.9  # diffusers clamps: most values must be unclamped to test
  assert _err(video, r["decoded"]) < DEC_TOL


def test_other_switches_match_diffusers(refs):
  """decoder_base_dim, num_res_blocks=1: whole-clip encode and decode."""
  folder, r = refs[0]["switches"]
  cfg, params = V.load_vae(os.path.join(folder, "vae"))
  assert cfg.decoder_base_dim == 12 and cfg.num_res_blocks == 1
  assert params["decoder"]["conv_out"]["kernel"].shape == (3, 3, 3, 12, 3)
  mean, logvar = jax.jit(lambda p, x: V.encode_moments(p, x, config=cfg, chunked=False))(params, r["video"])
  assert _err(mean, r["mean"]) < ENC_TOL and _err(logvar, r["logvar"]) < ENC_TOL
  video = V.decode_jit(params, r["latents"], config=cfg, chunked=False)
  assert video.shape == r["decoded"].shape and np.mean(np.abs(r["decoded"]) < 1) > 0.9
  assert _err(video, r["decoded"]) < DEC_TOL


def test_real_wan2p1_layout_matches_diffusers(refs):
  """Every key and shape of the real Wan2.1 VAE (diffusers defaults, built on torch's meta device)."""
  with open(os.path.join(refs[1], "wan2p1_shapes.json")) as f:
    theirs = {k: tuple(v) for k, v in json.load(f).items()}
  ours = V.diffusers_shapes(V.WAN2P1)
  assert ours == theirs
  assert sum(int(np.prod(s)) for s in ours.values()) == 126_892_531


def test_streaming_is_causal():
  """Frames never see the future: the latents / frames of a clip's prefix are those of the prefix alone (also
  covers the one-frame whole-clip paths: an image encodes to one latent, one latent decodes to one frame)."""
  cfg = V.TINY
  params = V.init_params(0, cfg)
  video = jax.random.uniform(jax.random.PRNGKey(1), (1, 5, 8, 8, 3), minval=-1, maxval=1)
  z = jax.random.normal(jax.random.PRNGKey(2), (1, 2, 1, 1, cfg.z_dim))
  enc = V.encode_jit(params, video, config=cfg, chunked=False)
  enc1 = V.encode_jit(params, video[:, :1], config=cfg, chunked=False)
  assert enc.shape == (1, 2, 1, 1, cfg.z_dim) and _err(enc[:, :1], enc1) < 1e-6
  dec = V.decode_jit(params, z, config=cfg, chunked=False)
  dec1 = V.decode_jit(params, z[:, :1], config=cfg, chunked=False)
  assert dec.shape == (1, 5, 8, 8, 3) and _err(dec[:, :1], dec1) < 1e-6
  # the future does change later frames (the test above is not vacuous)
  assert _err(V.encode_jit(params, video.at[:, 1:].set(0.0), config=cfg, chunked=False)[:, 1:], enc[:, 1:]) > 1e-3


def test_decode_chunk_by_chunk_matches_whole_decode():
  """decode_chunk over a generation's chunks (first 1 latent frame, then 2, then 3) gives `decode`'s frames."""
  cfg = V.TINY
  params = V.init_params(int(np.random.default_rng().integers(1 << 30)), cfg)
  z = jax.random.normal(jax.random.PRNGKey(int(np.random.default_rng().integers(1 << 30))), (1, 6, 2, 2, cfg.z_dim))
  whole = V.decode_jit(params, z, config=cfg)
  step = jax.jit(functools.partial(V.decode_chunk, config=cfg))
  frames, cache = [], None
  for f0, f1 in ((0, 1), (1, 3), (3, 6)):
    out, cache = step(params, z[:, f0:f1], cache)
    assert out.shape[1] == (1 if f0 == 0 else 4 * (f1 - f0))
    frames.append(out)
  assert _err(jnp.concatenate(frames, axis=1), whole) < 1e-6


def _write_folder(path, state, config):
  os.makedirs(path, exist_ok=True)
  save_file(state, os.path.join(path, "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)


TINY_JSON = {"_class_name": "AutoencoderKLWan", "base_dim": 8, "z_dim": 4, "num_res_blocks": 1,
             "latents_mean": list(V.TINY.latents_mean), "latents_std": list(V.TINY.latents_std),
             "is_residual": False, "patch_size": None, "dropout": 0.0}


def test_loader_round_trip_and_errors(tmp_path):
  params = V.init_params(1, V.TINY)
  state = V.to_diffusers_state_dict(params)
  _write_folder(tmp_path / "ok", state, TINY_JSON)
  cfg, loaded = V.load_vae(tmp_path / "ok")
  assert cfg == V.TINY
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, loaded))

  # missing and unknown keys: one error listing both
  bad = dict(state)
  del bad["decoder.up_blocks.1.upsamplers.0.time_conv.weight"]
  bad["encoder.extra.weight"] = np.zeros(3, np.float32)
  _write_folder(tmp_path / "keys", bad, TINY_JSON)
  with pytest.raises(UserError) as e:
    V.load_vae(tmp_path / "keys")
  msg = str(e.value)
  assert "decoder.up_blocks.1.upsamplers.0.time_conv.weight" in msg and "encoder.extra.weight" in msg
  assert "1 missing" in msg and "1 unknown" in msg

  # shape mismatch: the key and both shapes
  bad = dict(state)
  bad["encoder.conv_in.weight"] = np.zeros((8, 3, 3, 3, 1), np.float32)
  _write_folder(tmp_path / "shape", bad, TINY_JSON)
  with pytest.raises(UserError, match=r"encoder\.conv_in\.weight: checkpoint \(8, 3, 3, 3, 1\) vs expected "
                                      r"\(8, 3, 3, 3, 3\)"):
    V.load_vae(tmp_path / "shape")

  # Wan2.2's VAE is refused by name
  _write_folder(tmp_path / "wan22", state, {**TINY_JSON, "is_residual": True})
  with pytest.raises(UserError, match="Wan2.2"):
    V.load_vae(tmp_path / "wan22")
  with pytest.raises(UserError, match="config.json"):
    V.load_vae(tmp_path / "nothing")


def test_loader_reads_bf16(tmp_path):
  import ml_dtypes
  params = V.init_params(2, V.TINY)
  state = {k: v.astype(ml_dtypes.bfloat16) for k, v in V.to_diffusers_state_dict(params).items()}
  _write_folder(tmp_path, state, TINY_JSON)
  _, loaded = V.load_vae(tmp_path)
  want = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32), params)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), want, loaded))


def test_wan2p1_diffusers_config():
  """The vae/config.json of Wan-AI/Wan2.1-T2V-*-Diffusers (its keys, as diffusers writes them) is WAN2P1."""
  d = {"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.33.0.dev0", "attn_scales": [], "base_dim": 96,
       "dim_mult": [1, 2, 4, 4], "dropout": 0.0, "latents_mean": list(V.WAN2P1_LATENTS_MEAN),
       "latents_std": list(V.WAN2P1_LATENTS_STD), "num_res_blocks": 2, "temperal_downsample": [False, True, True],
       "z_dim": 16}
  assert V.config_from_diffusers(d) == V.WAN2P1
  assert V.config_from_diffusers({k: v for k, v in d.items() if k.startswith("_")}) == V.WAN2P1  # all defaults
  assert V.WAN2P1.latent_shape((1, 81, 480, 832, 3)) == (1, 21, 60, 104, 16)
  assert V.WAN2P1.video_shape((1, 21, 60, 104, 16)) == (1, 81, 480, 832, 3)
  with pytest.raises(UserError, match="does not know"):
    V.config_from_diffusers({**d, "some_new_switch": 1})


def test_input_checks():
  params = V.init_params(0, V.TINY)
  with pytest.raises(UserError, match="1 \\+ 4k"):
    V.encode(params, jnp.zeros((1, 4, 8, 8, 3)), config=V.TINY)
  with pytest.raises(UserError, match="multiples of 8"):
    V.encode(params, jnp.zeros((1, 5, 12, 8, 3)), config=V.TINY)
  with pytest.raises(UserError, match="latents must be"):
    V.decode(params, jnp.zeros((1, 2, 1, 1, 3)), config=V.TINY)
  with pytest.raises(UserError, match="temperal_downsample"):
    V.WanVAEConfig(temperal_downsample=(False, False, True))
  with pytest.raises(UserError, match="attn_scales"):
    V.WanVAEConfig(attn_scales=(0.5,))


def test_bfloat16_compute_close_to_float32():
  """dtype='bfloat16' (convs / attention in bf16, norms in fp32, params fp32) stays near the fp32 result."""
  cfg = V.TINY
  cfg16 = V.WanVAEConfig(**{**cfg.__dict__, "dtype": "bfloat16"})
  params = V.init_params(4, cfg)
  z = jax.random.normal(jax.random.PRNGKey(5), (1, 2, 1, 1, cfg.z_dim))  # shape of test_streaming_is_causal: fp32 jit reused
  ref = V.decode_jit(params, z, config=cfg, chunked=False)
  out = V.decode_jit(params, z, config=cfg16, chunked=False)
  assert out.dtype == jnp.float32
  err = _err(out, ref)
  assert 0 < err < 0.1, err  # bf16 has 8 mantissa bits: measured ~6e-2 max on the parity model's decode
