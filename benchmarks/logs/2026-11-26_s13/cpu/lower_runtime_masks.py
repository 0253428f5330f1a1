import sys, time, hashlib
import os; sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), *[os.pardir] * 4))
import jax, jax.numpy as jnp
from rcm_jax.inference import rollout
from rcm_jax.models.config import get_config
from rcm_jax.models.wan import WanModel, init_params
from rcm_jax.recipes.causal import BlockPattern
cfg = get_config("wan_1p3b", dtype="bfloat16", attention_impl="pallas", scan_layers=True)
model = WanModel(cfg)
params = jax.eval_shape(lambda k: {"params": jax.tree.map(lambda p: p.astype(jnp.bfloat16), init_params(cfg, k))}, jax.random.key(0))
plan = rollout.make_plan(BlockPattern(1, 1), 21)
schedules = rollout.schedules_for(plan, "consistency", 2, first_chunk_steps=2)
tpf = 1560
scratch = rollout.in_place_scratch(model, plan, tpf, "post_rope", "bfloat16")
cache = jax.eval_shape(lambda: rollout.init_cache(model, plan, 1, tpf, "bfloat16", scratch_tokens=scratch))
cond = {"context": jax.ShapeDtypeStruct((1, 512, cfg.text_dim), jnp.bfloat16)}
fn = rollout._stream_chunk_fn()
import pallas_kernels.attention as PA
PA._hopper_gpu = lambda: True
jax.default_backend = lambda: 'gpu'
for i in (1, 2, 10, 20):
  f0, f1 = plan.blocks[i]
  x = jax.ShapeDtypeStruct((1, f1 - f0, 60, 104, cfg.in_channels), jnp.float32)
  cross = jax.eval_shape(lambda p, x, c: rollout._cross_kv(model, p, x, c, c, 1.0), params, x, cond)
  pos = rollout.chunk_positions(plan, i, tpf)
  geom, dyn = rollout.runtime_geometry(rollout.chunk_geometry(plan, i, tpf, cache["k"].shape[2]))
  pos.update(dyn)
  pos = jax.tree.map(jnp.asarray, pos)
  t0 = time.perf_counter()
  low = fn.trace(model, params, cache, x, cond, cond, pos, jax.random.key(0), cross, geom=geom, times=schedules[i],
                 solver="consistency", cfg_scale=1.0, noisy_context=True, cache_keys="post_rope").lower(lowering_platforms=("cuda",))
  txt = low.as_text()
  print(i, geom, f"{time.perf_counter() - t0:.1f} s", hashlib.sha256(txt.encode()).hexdigest()[:16], "mosaic_gpu" in txt, flush=True)
