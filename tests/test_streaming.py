"""Streaming generation (rcm_jax/inference/rollout.py `stream`): KV cache vs no KV cache vs the rollout, rolling
window past the training length, compiles per chunk shape, int8 KV cache error bound, bad input."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rcm_jax.inference import rollout
from rcm_jax.models import masks
from rcm_jax.models.config import get_config
from rcm_jax.models.wan import WanModel, init_params
from rcm_jax.recipes.causal import BlockPattern

CFG = get_config("tiny", num_classes=3, num_actions=3, num_layers=2)   # 2 layers: context K/V depend on depth
B, H, W, C = 1, 4, 4, 4   # 2x2 patches -> 4 tokens per frame


def _params(seed=0, cfg=CFG):
  p = init_params(cfg, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return {"params": jax.tree.unflatten(tree, [l + 0.2 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])}


def _inputs(nf, seed):
  k1, k2 = jax.random.split(jax.random.key(seed))
  noise = jax.random.normal(k1, (B, nf, H, W, C))
  cond = {"labels": jnp.ones((B, 1), jnp.int32), "actions": jax.random.randint(k2, (B, nf), 0, 3)}
  null = {"labels": jnp.full((B, 1), 3, jnp.int32), "actions": jnp.full((B, nf), 3, jnp.int32)}
  return noise, cond, null


def _stream(pattern, nf, *, seed=0, num_steps=2, solver="consistency", cfg_scale=1.0, **kw):
  model, params = WanModel(CFG), _params(seed)
  noise, cond, null = _inputs(nf, seed + 5)
  plan = rollout.make_plan(pattern, nf)
  schedules = rollout.schedules_for(plan, solver, num_steps)
  chunks = list(rollout.stream(model, params, noise, cond, null, plan=plan, schedules=schedules, solver=solver,
                               cfg_scale=cfg_scale, rng=jax.random.key(seed + 9), **kw))
  video = np.concatenate([np.asarray(c.video) for c in chunks], axis=1)
  return video, chunks, plan, (model, params, noise, cond, null, schedules)


@pytest.mark.parametrize("noisy_context", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_rolling_window_longer_than_cache_kv_equals_no_kv(noisy_context):
  """7 frames through a 2-block window with 1 sink (a cache of 2 frames): the KV-cache stream and the
  recomputing stream give the same frames, chunk by chunk as they are yielded; (clean) so does the SF-DMD rollout."""
  pattern = BlockPattern(1, 1, local_blocks=2, sink_blocks=1)
  seed = int(np.random.default_rng().integers(1000))
  kv, chunks, plan, (model, params, noise, cond, null, schedules) = _stream(
      pattern, 7, seed=seed, noisy_context=noisy_context)
  assert plan.cache_frames == 2 and [c.index for c in chunks] == list(range(7))
  assert all(c.video.shape == (B, 1, H, W, C) and c.seconds > 0 for c in chunks)
  ref, _, _, _ = _stream(pattern, 7, seed=seed, noisy_context=noisy_context, kv_cache=False)
  np.testing.assert_allclose(kv, ref, atol=3e-5, rtol=1e-5)
  if noisy_context:
    return
  whole = rollout._rollout_jit(model, params, noise, cond, null, jax.random.key(seed + 9), plan=plan,
                               schedules=schedules, solver="consistency", cfg_scale=1.0, noisy_context=False,
                               cache_keys="post_rope")
  np.testing.assert_allclose(kv, np.asarray(whole), atol=3e-5, rtol=1e-5)


def test_chunkwise_euler_cfg_pre_rope_kv_equals_no_kv():
  pattern = BlockPattern(1, 2, local_blocks=2, sink_blocks=1)
  kw = dict(solver="euler", num_steps=2, cfg_scale=2.0, cache_keys="pre_rope")
  kv, chunks, plan, _ = _stream(pattern, 7, **kw)
  ref, _, _, _ = _stream(pattern, 7, kv_cache=False, **kw)
  assert [(c.f0, c.f1) for c in chunks] == [(0, 1), (1, 3), (3, 5), (5, 7)] and plan.cache_frames == 3
  np.testing.assert_allclose(kv, ref, atol=3e-5, rtol=1e-5)


def test_lookahead_dispatches_the_next_chunk_first_and_changes_no_frame():
  """lookahead (on for arrays) dispatches chunk i+1 before yielding chunk i; live (callable) inputs turn it off, so
  they are read one chunk after the last one shown; the frames are the same either way."""
  pattern = BlockPattern(1, 2, local_blocks=2, sink_blocks=1)
  seed = int(np.random.default_rng().integers(1000))
  on, _, plan, (model, params, noise, cond, null, schedules) = _stream(pattern, 5, seed=seed)
  off, _, _, _ = _stream(pattern, 5, seed=seed, lookahead=False)
  np.testing.assert_array_equal(on, off)
  for lookahead, read_first in ((None, [0]), (True, [0, 1])):
    reads = []

    def live_noise(i, f0, f1):
      reads.append(i)
      return noise[:, f0:f1]

    gen = rollout.stream(model, params, live_noise, cond, null, plan=plan, schedules=schedules,
                         rng=jax.random.key(seed + 9), lookahead=lookahead)
    first = next(gen)
    assert first.index == 0 and reads == read_first
    rest = list(gen)
    assert reads == list(range(len(plan.blocks)))
    np.testing.assert_array_equal(np.concatenate([np.asarray(c.video) for c in [first] + rest], 1), on)


@pytest.mark.parametrize("noisy_context,scan_layers", [(False, False), (True, True)])
def test_in_place_chunk_attention_equals_concatenation(noisy_context, scan_layers):
  """A cache buffer with scratch rows (what `stream` allocates for post-RoPE caches in the compute dtype): each
  layer attends its entry of the stacked cache in place (layers unrolled, or scanned with the stacks carried).
  Chunks whose slot is still empty sit in it; the others use the scratch rows and are moved to their slot.
  Chunk by chunk, the frames and the cache slots equal the concatenating path's, with stale values in the
  scratch and padding rows (the mask must hide them)."""
  pattern = BlockPattern(1, 2, local_blocks=2, sink_blocks=1)
  seed = int(np.random.default_rng().integers(1000))
  cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
  model, params = WanModel(cfg), _params(seed, cfg)
  noise, cond, null = _inputs(7, seed + 5)
  plan = rollout.make_plan(pattern, 7)
  schedules = rollout.schedules_for(plan, "consistency", 2)
  s = plan.cache_frames * 4
  concat = rollout.init_cache(model, plan, B, 4)
  buffer = rollout.init_cache(model, plan, B, 4, scratch_tokens=2 * 4)
  assert concat["k"].shape[2] == s and buffer["k"].shape[2] == rollout.CACHE_TOKEN_MULTIPLE
  junk = lambda x, i: x.at[:, :, s:].set(50 * jax.random.normal(jax.random.key(seed + i), x[:, :, s:].shape))
  buffer = {"k": junk(buffer["k"], 1), "v": junk(buffer["v"], 2)}
  placed = []
  for i, (f0, f1) in enumerate(plan.blocks):
    geom = rollout.chunk_geometry(plan, i, 4, buffer["k"].shape[2])
    at = plan.writes[i]
    assert geom.chunk_at == (at * 4 if geom.in_slot else s) and geom.mask.shape == (4 * (f1 - f0), buffer["k"].shape[2])
    assert geom.in_slot == (at is not None and set(plan.views[i][at:at + f1 - f0]) == {-1})
    placed.append(geom.in_slot)
    assert rollout.chunk_geometry(plan, i, 4, s).chunk_at is None
    kw = dict(plan=plan, i=i, times=schedules[i], noisy_context=noisy_context, rng=jax.random.key(seed + i))
    x_c, concat = rollout.chunk_step(model, params, concat, noise[:, f0:f1], rollout.slice_cond(cond, f0, f1),
                                     None, **kw)
    x_b, buffer = rollout.chunk_step(model, params, buffer, noise[:, f0:f1], rollout.slice_cond(cond, f0, f1),
                                     None, **kw)
    np.testing.assert_allclose(np.asarray(x_b), np.asarray(x_c), atol=3e-5, rtol=1e-5)
    for k in "kv":
      np.testing.assert_allclose(np.asarray(buffer[k][:, :, :s]), np.asarray(concat[k]), atol=3e-5, rtol=1e-5)
  assert True in placed and placed.count(False) >= 2   # both kinds: in an empty slot, and moved from the scratch


def test_chunk_in_its_empty_slot_mask_and_no_move():
  """masks.chunk_vs_cache(chunk_at=) inside the cache: the chunk's own keys sit at its empty slot, every other
  column as with the chunk after the cache; an occupied, misaligned or overflowing slot is refused. The in-slot
  chunk call lowers with the two cache-row moves (k and v) fewer than the same chunk in the scratch rows."""
  tpf, slots = 4, [0, -1, -1, 3, -1]
  default = masks.chunk_vs_cache(slots, 4, 2, tpf, key_len=32).to_dense()
  placed = masks.chunk_vs_cache(slots, 4, 2, tpf, key_len=32, chunk_at=4).to_dense()
  assert default[:, 20:28].all() and placed[:, 4:12].all()
  np.testing.assert_array_equal(np.delete(placed, np.s_[4:12], 1)[:, :12], np.delete(default, np.s_[4:12], 1)[:, :12])
  for at in (0, 6, 12, 16):   # slot 0 and 3 occupied, 6 not a frame start, 16 past the cache
    with pytest.raises(ValueError, match="empty frame slots"):
      masks.chunk_vs_cache(slots, 4, 2, tpf, key_len=32, chunk_at=at)
  model, params = WanModel(CFG), _params()
  plan = rollout.make_plan(BlockPattern(1, 1), 3)
  buffer = rollout.init_cache(model, plan, B, tpf, scratch_tokens=tpf)
  noise, cond, _ = _inputs(1, 0)
  geom = rollout.chunk_geometry(plan, 1, tpf, buffer["k"].shape[2])
  s = plan.cache_frames * tpf
  assert geom.in_slot and geom.chunk_at == plan.writes[1] * tpf < s
  scratch = dataclasses.replace(geom, in_slot=False, chunk_at=s,
                                mask=plan.mask(1, tpf, key_len=buffer["k"].shape[2], chunk_at=s))
  slices = lambda g: jax.jit(lambda c: rollout.chunk_step(
      model, params, c, noise, rollout.slice_cond(cond, 0, 1), None, plan=plan, i=1, times=(1.0, 0.0), geom=g)
  ).lower(buffer).as_text().count("stablehlo.dynamic_slice ")
  assert slices(scratch) - slices(geom) == 2


def test_in_place_bad_input():
  model, params = WanModel(CFG), _params()
  plan = rollout.make_plan(BlockPattern(1, 1), 3)
  with pytest.raises(ValueError, match="int8"):
    rollout.init_cache(model, plan, B, 4, "int8", scratch_tokens=4)
  buffer = rollout.init_cache(model, plan, B, 4, scratch_tokens=4)
  noise, cond, _ = _inputs(1, 0)
  cond = rollout.slice_cond(cond, 0, 1)
  geom = rollout.chunk_geometry(plan, 1, 4, buffer["k"].shape[2])
  call = lambda **kw: model.apply(params, noise, jnp.ones((B, 1)), **cond, kv_cache=buffer, **kw)
  with pytest.raises(ValueError, match="post-RoPE"):
    call(mask=geom.mask, cache_chunk_at=geom.chunk_at, cache_positions=np.zeros(plan.cache_frames, np.int32))
  with pytest.raises(ValueError, match="compute dtype"):
    model.apply(params, noise, jnp.ones((B, 1)), **cond, mask=geom.mask, cache_chunk_at=geom.chunk_at,
                kv_cache=jax.tree.map(lambda x: x.astype(jnp.bfloat16), buffer))
  with pytest.raises(ValueError, match="must be \\[L, S\\]"):
    call(mask=plan.mask(1, 4), cache_chunk_at=geom.chunk_at)
  with pytest.raises(ValueError, match="must fit"):
    call(mask=geom.mask, cache_chunk_at=buffer["k"].shape[2] - 2)


def _dots(fn, *args) -> int:
  """dot_general ops in fn's lowered program (a scan body counts once)."""
  return jax.jit(fn).lower(*args).as_text().count("stablehlo.dot_general")


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cross_kv_projected_once_is_reused(scan_layers):
  """WanModel(return_cross_kv=True) gives every layer's cross-attention k/v of the context; a call given them
  returns what the call projecting them returns, and its program has no text embedder and no k/v projection
  of the context left (2 dots of the embedder, 2 per layer body)."""
  seed = int(np.random.default_rng().integers(1000))
  cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
  model, params = WanModel(cfg), _params(seed, cfg)
  noise, cond, _ = _inputs(2, seed)
  t = jax.random.uniform(jax.random.key(seed), (B, 2))
  ckv = model.apply(params, noise, t, **cond, return_cross_kv=True)
  assert ckv["k"].shape == ckv["v"].shape == (cfg.num_layers, B, 1, cfg.num_heads, cfg.head_dim)
  projecting = lambda: model.apply(params, noise, t, **cond)
  reusing = lambda c: model.apply(params, noise, t, **cond, cross_kv=c)
  np.testing.assert_allclose(np.asarray(reusing(ckv)), np.asarray(projecting()), rtol=1e-6, atol=1e-6)
  assert _dots(projecting) - _dots(reusing, ckv) == 2 + 2 * (1 if scan_layers else cfg.num_layers)
  # the concatenating KV-cache path (training rollouts, --concat_kv, int8 and pre-RoPE streams) too
  plan = rollout.make_plan(BlockPattern(1, 1), 3)
  cache = jax.tree.map(lambda x: jax.random.normal(jax.random.key(seed + 1), x.shape),
                       rollout.init_cache(model, plan, B, 4))
  kw = dict(kv_cache=cache, mask=plan.mask(1, 4), frame_positions=np.array([1], np.int32))
  x1, t1, c1 = noise[:, :1], t[:, :1], rollout.slice_cond(cond, 0, 1)
  want = model.apply(params, x1, t1, **c1, **kw)
  got = model.apply(params, x1, t1, **c1, **kw, cross_kv=ckv)
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="return_cross_kv"):
    reusing({"k": ckv["k"][:1], "v": ckv["v"][:1]})


def test_stream_projects_the_context_once(monkeypatch):
  """Array conditions: the stream projects the cross-attention k/v once, and the chunk function given them
  projects nothing (it does once per chunk when given None, as for live conditions). Live (callable) conditions
  give the same frames, CFG included (the k/v then cover [cond | null])."""
  pattern = BlockPattern(1, 2, local_blocks=2, sink_blocks=1)
  seed = int(np.random.default_rng().integers(1000))
  calls, project, given, chunk_fn = [], rollout._CROSS_KV, [], rollout._stream_chunk_fn()
  monkeypatch.setattr(rollout, "_CROSS_KV", lambda *a, **kw: calls.append(a) or project(*a, **kw))

  def spy(*a, **kw):   # records whether each chunk got the stream's k/v (its 9th argument)
    given.append(a[8] is not None)
    return chunk_fn(*a, **kw)

  spy._cache_size = chunk_fn._cache_size
  monkeypatch.setattr(rollout, "_stream_chunk_fn", lambda: spy)
  once, _, plan, (model, params, noise, cond, null, schedules) = _stream(pattern, 5, seed=seed, cfg_scale=2.0)
  assert len(calls) == 1 and given == [True] * len(plan.blocks)
  live = lambda i, f0, f1: rollout.slice_cond(cond, f0, f1)
  chunks = list(rollout.stream(model, params, noise, live, null, plan=plan, schedules=schedules, cfg_scale=2.0,
                               rng=jax.random.key(seed + 9)))
  assert len(calls) == 1 and given == [True] * len(plan.blocks) + [False] * len(plan.blocks)
  np.testing.assert_allclose(np.concatenate([np.asarray(c.video) for c in chunks], 1), once, rtol=1e-5, atol=1e-6)
  # the chunk function itself: given the k/v it has 2 + 2 fewer dots (embedder, one scanned or 2-layer body each)
  c0, n0, x0 = rollout.slice_cond(cond, 0, 1), rollout.slice_cond(null, 0, 1), noise[:, :1]
  ckv = project(model, params, x0, c0, n0, cfg_scale=2.0)
  cache = rollout.init_cache(model, plan, 2 * B, 4, scratch_tokens=8)
  static = dict(geom=rollout.chunk_geometry(plan, 0, 4, cache["k"].shape[2]), times=schedules[0],
                solver="consistency", cfg_scale=2.0, noisy_context=False, cache_keys="post_rope")
  chunk = lambda c: rollout._stream_chunk_impl(model, params, cache, x0, c0, n0, jax.tree.map(
      jnp.asarray, rollout.chunk_positions(plan, 0, 4)), jax.random.key(0), c, **static)
  assert ckv["k"].shape[1] == 2 * B
  assert _dots(lambda: chunk(None)) - _dots(chunk, ckv) == 2 + 2 * CFG.num_layers


def test_one_compile_per_chunk_shape():
  """Frame-wise, 1-block window + 1 sink, 8 chunks: the first chunk, the filling one, the steady state
  and the unwritten last chunk compile; the steady-state chunks reuse one executable."""
  pattern = BlockPattern(1, 1, local_blocks=2, sink_blocks=1)
  _, chunks, plan, _ = _stream(pattern, 8, num_steps=1, seed=3)
  geoms = {rollout.chunk_geometry(plan, i, 4) for i in range(len(plan.blocks))}
  compiled = sum(c.compiled for c in chunks)
  assert len(geoms) <= 4 < len(chunks)
  assert compiled <= len(geoms)          # never more than one compile per distinct geometry (cache may be warm)
  _, again, _, _ = _stream(pattern, 8, num_steps=1, seed=4)
  assert not any(c.compiled for c in again)


def test_int8_kv_cache_error_bound():
  x = jax.random.normal(jax.random.key(int(np.random.default_rng().integers(1000))), (2, 3, 16, 2, 8)) * 3.0
  q, scale = rollout.quantize_int8(x)
  assert q.dtype == jnp.int8 and scale.shape == (2, 3, 16, 2, 1)
  err = np.abs(np.asarray(rollout.dequantize_int8(q, scale), np.float64) - np.asarray(x, np.float64))
  bound = np.abs(np.asarray(x, np.float64)).max(-1, keepdims=True) / 254
  assert (err <= bound * (1 + 1e-5) + 1e-7).all()
  # the stream: int8 cache frames stay close to the fp32-cache frames, and the int8 path is really taken
  pattern = BlockPattern(1, 1, local_blocks=2, sink_blocks=1)
  fp, _, _, _ = _stream(pattern, 5, seed=7)
  i8, _, _, (model, _, noise, _, _, _) = _stream(pattern, 5, seed=7, kv_cache_dtype="int8")
  cache = rollout.init_cache(model, rollout.make_plan(pattern, 5), 1, 4, "int8")
  assert cache["k"].dtype == jnp.int8 and cache["k_scale"].shape[-1] == 1
  np.testing.assert_allclose(fp[:, 0], i8[:, 0], atol=1e-6)    # the first chunk reads no cache
  diff = np.abs(fp[:, 1:] - i8[:, 1:]).max()
  assert 0 < diff < 0.05 * np.abs(fp).max(), diff


def test_bad_input():
  model, params = WanModel(CFG), _params()
  noise, cond, _ = _inputs(3, 0)
  plan = rollout.make_plan(BlockPattern(1, 1), 3)
  sched = rollout.schedules_for(plan, "consistency", 1)
  with pytest.raises(rollout.StreamError, match="sample.actions"):
    next(rollout.stream(model, params, noise, {"labels": cond["labels"]}, plan=plan, schedules=sched))
  with pytest.raises(rollout.StreamError, match="sample.kv_cache_dtype"):
    next(rollout.stream(model, params, noise, cond, plan=plan, schedules=sched, kv_cache_dtype="fp8"))
  long_plan = rollout.make_plan(BlockPattern(1, 1, local_blocks=2, sink_blocks=1), CFG.rope_max_seq_len + 1)
  with pytest.raises(rollout.StreamError, match="rope_max_seq_len"):
    next(rollout.stream(model, params, lambda i, a, b: noise[:, :1], cond, plan=long_plan,
                        schedules=rollout.schedules_for(long_plan, "consistency", 1)))


def test_sample_job_streams_pngs_longer_than_data_and_refuses_bad_input(tmp_path):
  """The `sample` job's streaming path (rcm_jax/play/stream_job.py) on the camera-pan world: one PNG per chunk
  as chunks finish, 10 frames from 4-frame data through a window, actions from sample.actions."""
  import json
  import ml_collections
  from rcm_jax.data import worlds
  from rcm_jax.play import stream_job
  world = worlds.CameraPan({"size": 16, "frames": 4, "photo_height": 48, "step": 2})
  raw = world.generate(2, 0, "test")
  batch = {"video": raw["video"], "cond": world.model_inputs(raw), "null": world.null_inputs(raw)}
  cfg = get_config("tiny", in_channels=3, out_channels=3, num_actions=5, cond_channels=4, patch_size=(1, 4, 4))
  model, params = WanModel(cfg), {"params": init_params(cfg, jax.random.key(0))}
  src = tmp_path / "stage"
  src.mkdir()
  (src / "config.json").write_text(json.dumps({"recipe": "sf_dmd"}))
  config = ml_collections.ConfigDict(dict(
      seed=0, causal=dict(first_chunk_frames=1, chunk_frames=3, local_blocks=2, sink_blocks=1),
      sample=dict(steps=1, solver="consistency", cfg_scale=1.0, shift=1.0, noisy_context=True, batch_size=2,
                  cache_keys="post_rope", cache_frames=0, kv_cache_dtype="int8", no_kv_cache=False,
                  num_frames=10, actions="right,right,down")))
  prepared = (world, model, params, str(src), raw, batch)
  out = stream_job.sample_stream(config, str(tmp_path / "run"), prepared)
  pngs = sorted(os.listdir(tmp_path / "run" / "samples" / "stream"))
  assert pngs == [f"batch00_chunk{i:04d}.png" for i in range(4)]        # blocks (0,1) (1,4) (4,7) (7,10)
  assert out["num_frames"] == 10 and out["cache_frames"] == 4 and len(out["chunks"]) == 4
  assert os.path.exists(out["gif"]) and os.path.exists(out["mp4"])
  assert np.load(tmp_path / "run" / "samples" / "samples.npz")["videos"].shape == (2, 10, 16, 16, 3)
  with config.unlocked():
    config.sample.actions = ""
  with pytest.raises(stream_job.StreamConfigError, match="sample.actions"):   # 4 frames of actions, 10 asked
    stream_job.sample_stream(config, str(tmp_path / "run2"), prepared)
  (src / "config.json").write_text(json.dumps({"recipe": "rf"}))
  with pytest.raises(stream_job.StreamConfigError, match="bidirectional"):
    stream_job.sample_stream(config, str(tmp_path / "run3"), prepared)


def test_first_chunk_steps_from_config():
  """sample.first_chunk_steps reaches the stream's schedules: the first chunk only (default: the paper's 4)."""
  import ml_collections
  from rcm_jax.diffusion import samplers
  from rcm_jax.play import stream_job
  config = ml_collections.ConfigDict(dict(causal=dict(first_chunk_frames=1, chunk_frames=2),
                                          sample=dict(steps=2, shift=1.0, cache_frames=0)))
  close = lambda a, b: len(a) == len(b) and np.allclose(a, b, rtol=1e-6)     # float32 times
  _, default = stream_job.make_stream_plan(config, 5)
  assert close(default[0], samplers.FOUR_STEP) and all(close(s, samplers.FEW_STEP_LATER_CHUNKS[2])
                                                        for s in default[1:])
  config.sample.first_chunk_steps = 1
  _, fast = stream_job.make_stream_plan(config, 5)
  assert close(fast[0], samplers.FEW_STEP_LATER_CHUNKS[1]) and fast[1:] == default[1:]
  config.sample.first_chunk_steps = 3
  with pytest.raises(ValueError, match="sample.first_chunk_steps"):
    stream_job.make_stream_plan(config, 5)


def test_streaming_benchmark_counts_persistent_cache_hits_from_jax_log():
  """benchmarks/streaming.py --compile_cache: its CacheLog counts the chunk functions' persistent-cache hits and
  misses from jax's own log calls (the messages jax._src.compiler emits), and keeps every event's key."""
  import importlib.util
  from jax._src import compiler
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("streaming_bench", os.path.join(root, "benchmarks", "streaming.py"))
  sb = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sb)
  log = sb.CacheLog().install()
  try:
    rng = np.random.default_rng()
    hits, misses = int(rng.integers(0, 5)), int(rng.integers(1, 5))
    keys = [f"jit__stream_chunk_impl-{rng.integers(1 << 60):x}" for _ in range(hits + misses)]
    for i, key in enumerate(keys):
      (compiler.log_persistent_cache_hit if i < hits else compiler.log_persistent_cache_miss)(
          "jit__stream_chunk_impl", key)
    compiler.log_persistent_cache_miss("jit_convert_element_type", "jit_convert_element_type-0")  # not a chunk
    row = log.take()
  finally:
    log.uninstall()
  assert row["persistent_cache_chunk_hits"] == hits and row["persistent_cache_chunk_misses"] == misses
  assert len(row["persistent_cache_events"]) == hits + misses + 1
  assert all(k in e for k, e in zip(keys, row["persistent_cache_events"]))
  assert log.take()["persistent_cache_events"] == []      # take() empties it


@pytest.mark.parametrize("pattern,nf,counts", [(BlockPattern(1, 1), 5, (3, 5)),
                                               pytest.param(BlockPattern(1, 1, local_blocks=2, sink_blocks=1), 8,
                                                            (4, 4), marks=pytest.mark.slow)])
def test_runtime_masks_give_the_same_frames_with_one_function_per_chunk_role(pattern, nf, counts):
  """stream(runtime_masks=True): each in-place chunk's mask (its key intervals) and its row in the buffer are
  run-time inputs (`rollout.runtime_geometry`), so the chunks that play one role (size and step schedule, written
  or not, in their slot or from the scratch rows) share one compiled function: a whole-video frame-wise cache
  compiles 3 (the 4-step first chunk, the written ones, the last), not 5. The frames equal the static
  masks' chunk by chunk, with a window and a sink too (chunks moved from the scratch rows to their slot; a window
  already bounds the compiles)."""
  seed = int(np.random.default_rng().integers(1000))
  run, chunks, _, _ = _stream(pattern, nf, seed=seed, runtime_masks=True)   # first: the static run would warm
  ref, _, plan, (model, _, _, _, _, schedules) = _stream(pattern, nf, seed=seed)   # the cache for a broken one
  np.testing.assert_allclose(run, ref, atol=3e-5, rtol=1e-5)
  scratch = rollout.in_place_scratch(model, plan, 4, "post_rope", "float32")
  buffer = rollout.init_cache(model, plan, B, 4, scratch_tokens=scratch)["k"].shape[2]
  static = [(rollout.chunk_geometry(plan, i, 4, buffer), schedules[i]) for i in range(len(plan.blocks))]
  roles = {(rollout.runtime_geometry(g)[0], t) for g, t in static}
  assert (len(roles), len(set(static))) == counts
  assert sum(c.compiled for c in chunks) <= len(roles)
  with pytest.raises(ValueError, match="in-place"):
    rollout.runtime_geometry(rollout.chunk_geometry(plan, 0, 4))
