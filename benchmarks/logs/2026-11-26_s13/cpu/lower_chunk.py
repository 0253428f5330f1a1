"""Trace + lower (for CUDA, on the CPU) the stream's chunk function at Wan2.1-1.3B shape: the host-side part of a
chunk geometry's compile. The Mosaic kernels are forced on (as on an H100) by patching the backend checks.
  usage: lower_chunk.py STEPS noisy|clean FIRST_CHUNK_FRAMES CHUNK_FRAMES CHUNK_INDICES [runtime]
  runtime: the chunks' masks and rows as run-time inputs (rollout.runtime_geometry); the printed module hashes
  then show which chunks share one function."""
import hashlib, os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), *[os.pardir] * 4))
import jax, jax.numpy as jnp
from rcm_jax.inference import rollout
from rcm_jax.models.config import get_config
from rcm_jax.models.wan import WanModel, init_params
from rcm_jax.recipes.causal import BlockPattern
steps, noisy, first, chunk = int(sys.argv[1]), sys.argv[2] == "noisy", int(sys.argv[3]), int(sys.argv[4])
idx = [int(a) for a in sys.argv[5].split(",")]
runtime = sys.argv[6:] == ["runtime"]
cfg = get_config("wan_1p3b", dtype="bfloat16", attention_impl="pallas", scan_layers=True)
model = WanModel(cfg)
params = jax.eval_shape(lambda k: {"params": jax.tree.map(lambda p: p.astype(jnp.bfloat16), init_params(cfg, k))}, jax.random.key(0))
plan = rollout.make_plan(BlockPattern(first, chunk), 21)
schedules = rollout.schedules_for(plan, "consistency", steps, first_chunk_steps=steps)
tpf = 1560
scratch = rollout.in_place_scratch(model, plan, tpf, "post_rope", "bfloat16")
cache = jax.eval_shape(lambda: rollout.init_cache(model, plan, 1, tpf, "bfloat16", scratch_tokens=scratch))
cond = {"context": jax.ShapeDtypeStruct((1, 512, cfg.text_dim), jnp.bfloat16)}
fn = rollout._stream_chunk_fn()
import pallas_kernels.attention as PA
PA._hopper_gpu = lambda: True
jax.default_backend = lambda: 'gpu'
for i in idx:
  f0, f1 = plan.blocks[i]
  x = jax.ShapeDtypeStruct((1, f1 - f0, 60, 104, cfg.in_channels), jnp.float32)
  cross = jax.eval_shape(lambda p, x, c: rollout._cross_kv(model, p, x, c, c, 1.0), params, x, cond)
  pos = rollout.chunk_positions(plan, i, tpf)
  geom = rollout.chunk_geometry(plan, i, tpf, cache["k"].shape[2])
  if runtime:
    geom, dynamic = rollout.runtime_geometry(geom)
    pos.update(dynamic)
  pos = jax.tree.map(jnp.asarray, pos)
  t0 = time.perf_counter()
  tr = fn.trace(model, params, cache, x, cond, cond, pos, jax.random.key(0), cross, geom=geom, times=schedules[i],
                solver="consistency", cfg_scale=1.0, noisy_context=noisy, cache_keys="post_rope")
  t1 = time.perf_counter()
  low = tr.lower(lowering_platforms=("cuda",))
  t2 = time.perf_counter()
  text = low.as_text()
  print(f"chunk {i}: trace {t1 - t0:.2f} s, lower {t2 - t1:.2f} s, module {len(text) / 1e6:.1f} MB, "
        f"hash {hashlib.sha256(text.encode()).hexdigest()[:16]}", flush=True)
