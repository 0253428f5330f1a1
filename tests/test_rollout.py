"""KV-cache rollout (rcm_jax/inference/rollout.py) against the uncached causal sampler, block by block."""
import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from rcm_jax.inference import causal_sample, rollout
from rcm_jax.models.config import get_config
from rcm_jax.models.wan import WanModel, init_params, loop_to_scan_params
from rcm_jax.recipes.causal import BlockPattern

CFG = get_config("tiny", num_classes=3, num_actions=3, num_layers=1)
B, H, W, C = 1, 4, 4, 4   # 2x2 patches -> 4 tokens per frame


def _params(cfg=CFG, seed=0):
  p = init_params(cfg, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return {"params": jax.tree.unflatten(tree, [l + 0.2 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])}


def _inputs(nf, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  noise = jax.random.normal(k1, (B, nf, H, W, C))
  cond = {"labels": jnp.ones((B, 1), jnp.int32), "actions": jax.random.randint(k2, (B, nf), 0, 3)}
  null = {"labels": jnp.full((B, 1), 3, jnp.int32), "actions": jnp.full((B, nf), 3, jnp.int32)}
  return noise, cond, null


def _compare(pattern, nf, *, noisy_context, cache_keys, num_steps=2, solver="consistency", cfg_scale=1.0,
             cfg=CFG, params=None, cache_frames=0):
  model = WanModel(cfg)
  params = params or _params(cfg)
  noise, cond, null = _inputs(nf)
  rng = jax.random.key(7)
  ref = causal_sample.sample(model, params, noise, cond, null, pattern=pattern, num_steps=num_steps,
                             cfg_scale=cfg_scale, solver=solver, noisy_context=noisy_context, rng=rng)
  plan = rollout.make_plan(pattern, nf, cache_frames)
  out = rollout._rollout_jit(model, params, noise, cond, null, rng, plan=plan,
                             schedules=rollout.schedules_for(plan, solver, num_steps), solver=solver,
                             cfg_scale=cfg_scale, noisy_context=noisy_context, cache_keys=cache_keys)
  for f0, f1 in plan.blocks:   # block by block
    np.testing.assert_allclose(out[:, f0:f1], ref[:, f0:f1], atol=2e-5, rtol=1e-5, err_msg=f"frames {f0}:{f1}")
  return plan


SLOW = pytest.mark.slow


@pytest.mark.parametrize("noisy_context,cache_keys", [
    (False, "post_rope"), (True, "pre_rope"),
    pytest.param(True, "post_rope", marks=SLOW), pytest.param(False, "pre_rope", marks=SLOW)])
def test_cached_equals_uncached_framewise(noisy_context, cache_keys):
  _compare(BlockPattern(1, 1), 4, noisy_context=noisy_context, cache_keys=cache_keys)


@pytest.mark.parametrize("cache_keys", ["pre_rope", pytest.param("post_rope", marks=SLOW)])
def test_cached_equals_uncached_chunkwise_euler_cfg(cache_keys):
  _compare(BlockPattern(1, 2), 5, noisy_context=False, cache_keys=cache_keys, solver="euler", num_steps=2,
           cfg_scale=2.0)


@pytest.mark.parametrize("noisy_context,cache_keys", [(True, "post_rope"), pytest.param(False, "pre_rope",
                                                                                         marks=SLOW)])
def test_rolling_window_with_sinks_reuses_slots(noisy_context, cache_keys):
  pattern = BlockPattern(1, 1, local_blocks=2, sink_blocks=1)
  plan = _compare(pattern, 6, noisy_context=noisy_context, cache_keys=cache_keys, num_steps=1)
  assert plan.cache_frames == 2 < 6   # sink + one window block, slots reused


@pytest.mark.parametrize("cache_keys", ["post_rope", pytest.param("pre_rope", marks=SLOW)])
def test_bf16_model_cache_in_compute_dtype_gives_the_same_frames_as_fp32(cache_keys):
  # the training rollout keeps its cache in the compute dtype (half the memory of fp32 for a bf16 model);
  # attention reads k/v in that dtype, so the frames must be bit-identical to an fp32 cache's
  cfg = CFG.replace(dtype="bfloat16")
  model, params = WanModel(cfg), _params(cfg, seed=3)
  noise, cond, null = _inputs(4, seed=5)
  plan = rollout.make_plan(BlockPattern(1, 1), 4)
  kw = dict(plan=plan, schedules=rollout.schedules_for(plan, "consistency", 2), noisy_context=False,
            cache_keys=cache_keys, rng=jax.random.key(2))
  b16 = rollout.rollout(model, params, noise, cond, null, **kw)
  f32 = rollout.rollout(model, params, noise, cond, null, **kw,
                        cache=rollout.init_cache(model, plan, B, 4, "float32"))
  assert rollout.init_cache(model, plan, B, 4, cfg.compute_dtype)["k"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(b16), np.asarray(f32))
  assert float(jnp.max(jnp.abs(b16))) > 0


def test_remat_policy_applies_on_the_kv_cache_path():
  # SF-DMD backpropagates through every chunk's exit step of a cached rollout: under remat "full" the backward
  # keeps no per-layer activations (nothing of the FFN's hidden width, 88 here, unlike any other tensor), and
  # the gradients equal those without remat. (The cache path once ignored the policy: 373 GiB at Wan 1.3B.)
  noise, cond, null = _inputs(4, seed=2)
  plan = rollout.make_plan(BlockPattern(2, 2), 4)
  grads, residuals = {}, {}
  for policy in ("none", "full"):
    cfg = CFG.replace(ffn_dim=88, scan_layers=True, remat_policy=policy)
    model, params = WanModel(cfg), _params(cfg, seed=4)

    def loss(p):
      x = rollout.rollout(model, p, noise, cond, null, plan=plan, schedules=rollout.schedules_for(
          plan, "consistency", 2), exit_steps=[2, 2], rng=jax.random.key(1))
      return jnp.sum(jnp.square(x))
    grads[policy] = jax.grad(loss)(params)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      print_saved_residuals(loss, params)
    residuals[policy] = [l for l in out.getvalue().splitlines() if ",88]" in l and "from the argument" not in l]
  assert residuals["none"], "the check must see the FFN activations when nothing is rematerialised"
  assert not residuals["full"], residuals["full"][:3]
  for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads["full"])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=1e-6)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads["full"])) > 0


@pytest.mark.parametrize("noisy_context,cache_keys", [(False, "post_rope"), (True, "pre_rope")])
def test_replayed_backprop_keeps_one_cache_and_gives_the_same_frames_and_gradients(noisy_context, cache_keys):
  noise, cond, null = _inputs(6, seed=6)
  plan = rollout.make_plan(BlockPattern(2, 2), 6)          # 3 chunks, cache of 4 frames x 4 tokens
  cfg = CFG.replace(scan_layers=True, remat_policy="full")   # as SF-DMD trains: the blocks keep only inputs
  model, params = WanModel(cfg), _params(cfg, seed=8)
  s_tokens = plan.cache_frames * 4
  out, grads, cache_copies = {}, {}, {}
  for replay in (False, True):
    def loss(p, replay=replay):
      x = rollout.rollout(model, p, noise, cond, null, plan=plan, schedules=rollout.schedules_for(
          plan, "consistency", 2), exit_steps=[2, 1, 2], rng=jax.random.key(3), noisy_context=noisy_context,
          cache_keys=cache_keys, replay_backprop=replay)
      return jnp.sum(jnp.square(x)), x
    (_, out[replay]), grads[replay] = jax.value_and_grad(loss, has_aux=True)(params)
    lines = io.StringIO()
    with contextlib.redirect_stdout(lines):
      print_saved_residuals(lambda p: loss(p)[0], params)
    cache_copies[replay] = sum(f",{s_tokens},2,24]" in l for l in lines.getvalue().splitlines())
  # the replayed exit calls run as one call over the video: the same frames up to float reassociation
  np.testing.assert_allclose(np.asarray(out[True]), np.asarray(out[False]), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads[False]), jax.tree.leaves(grads[True])):   # f32 sums reordered: leaf scale
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(a))))
  # k and v [layers, B, S, H, Dh]: one copy per chunk without replay, the final cache alone with it
  assert cache_copies[False] == 6 and cache_copies[True] == 2, cache_copies
  assert rollout.final_cache_serves_every_chunk(plan)
  assert not rollout.final_cache_serves_every_chunk(
      rollout.make_plan(BlockPattern(1, 1, local_blocks=2, sink_blocks=1), 6))


@pytest.mark.parametrize("replay", [True, False])
def test_rollouts_without_gradients_through_the_cache_write_it_in_place(replay):
  """Replay's first pass (replay=True, the gradient of an SF-DMD rollout) and a sampling rollout (no exit steps)
  attend each chunk inside a cache buffer with scratch rows. Without them every cached model call built a new
  [layers, B, S, H, Dh] stack of k and v from a zero-initialised copy, and XLA made those copies at the
  program's start, all alive at once: SF-DMD at 21 frames (Wan 1.3B) compiled to 58 GiB of temporaries on an
  H100, 24 copies of 2.4 GiB."""
  nf = 12
  noise, cond, null = _inputs(nf, seed=2)
  plan = rollout.make_plan(BlockPattern(2, 2), nf)          # 6 chunks
  cfg = CFG.replace(scan_layers=True, remat_policy="full", num_layers=2)
  model, params = WanModel(cfg), _params(cfg, seed=4)
  schedules = rollout.schedules_for(plan, "consistency", 2)

  def loss(p):
    x = rollout.rollout(model, p, noise, cond, null, plan=plan, schedules=schedules,
                        exit_steps=[2, 1, 2, 1, 2, 1], rng=jax.random.key(5), replay_backprop=True)
    return jnp.sum(jnp.square(x))

  sample = lambda p: rollout.rollout(model, p, noise, cond, null, plan=plan, schedules=schedules,
                                     rng=jax.random.key(5))
  hlo = jax.jit(jax.grad(loss) if replay else sample).lower(params).compile().as_text()
  stack = rf"f32\[{cfg.num_layers},{B},\d+,{cfg.num_heads},{cfg.head_dim}\]"
  copies = re.findall(rf"= {stack}\S* copy\(", hlo)
  assert re.search(rf"= {stack}\S* dynamic-update-slice\(", hlo), "the check must see the cache writes"
  assert len(copies) <= 2, f"{len(copies)} copies of a whole k/v cache stack"


@SLOW
def test_scan_layers_cache_path():
  cfg = CFG.replace(scan_layers=True)
  params = {"params": loop_to_scan_params(_params()["params"], CFG.num_layers)}
  _compare(BlockPattern(1, 1), 3, noisy_context=False, cache_keys="post_rope", cfg=cfg, params=params)


def test_plan_and_mask():
  plan = rollout.make_plan(BlockPattern(1, 2), 5)
  assert plan.blocks == ((0, 1), (1, 3), (3, 5)) and plan.writes == (0, 1, None) and plan.cache_frames == 3
  m = plan.mask(2, 4).to_dense()
  assert m.shape == (8, 12 + 8) and m[:, :12].all() and m[:, 12:].all()
  m0 = plan.mask(0, 4).to_dense()
  assert not m0[:, :12].any()


def test_bad_inputs_name_the_key():
  with pytest.raises(ValueError, match="rollout.cache_frames"):
    rollout.make_plan(BlockPattern(1, 1), 6, cache_frames=3)
  with pytest.raises(ValueError, match="causal.local_blocks"):
    rollout.make_plan(BlockPattern(1, 1), 6, cache_frames=3)
  rollout.make_plan(BlockPattern(1, 1, local_blocks=2, sink_blocks=1), 6, cache_frames=3)   # window: fits
  with pytest.raises(ValueError, match=r"dmd.schedule"):
    rollout.check_schedule((1.0, 0.5, 0.5, 0.0), "dmd.schedule")
  with pytest.raises(ValueError, match=r"rollout.schedules\[1\]"):
    plan = rollout.make_plan(BlockPattern(1, 1), 2)
    rollout.check_rollout_args(plan, ((1.0, 0.0), (0.2, 0.5, 0.0)), "consistency", False, "post_rope")
  with pytest.raises(ValueError, match="rollout.cache_keys"):
    rollout.check_rollout_args(plan, ((1.0, 0.0),) * 2, "consistency", False, "fp8")
