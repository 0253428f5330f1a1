"""The generic trainer: `train(config, workdir)` runs one stage of any registered recipe.

Read top to bottom: config checks -> data -> model and recipe -> state (init, `init_from`, resume) ->
the jitted update (grad accumulation, NaN guard, optimizer, EMA) -> the loop (progress, logs,
checkpoints, SIGTERM/SIGINT, profiler) -> final checkpoint, samples, metrics.json.

Determinism: the rng of step k is `fold_in(key(seed), k)` and the data pipeline is indexed by step, so a
run killed at any point and resumed from its last checkpoint reproduces the unbroken run's losses.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from rcm_jax import parallel, recipes
from rcm_jax.errors import UserError
from rcm_jax.training import checkpoint, ema, optim
from rcm_jax.training import setup as setup_lib
from rcm_jax.training.state import TrainState
from rcm_jax.training.writer import Writer, write_metrics, write_video


class TrainingDiverged(UserError):
  """Too many non-finite updates in a row; the message says what to change."""


def _split_micro(batch, accum: int):
  """Leading batch axis B -> [accum, B / accum]."""
  return jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)


def make_update(recipe, tx, config):
  """The update: (state, frozen, batch, rng) -> (state, metrics). Non-finite updates are skipped."""
  accum = config.train.grad_accum
  ema_cfg = config.ema
  grad_fn = jax.value_and_grad(recipe.loss, has_aux=True)

  def update(state: TrainState, frozen, batch, rng):
    if getattr(recipe, "needs_ema", False) and state.ema is not None:   # TF-dCM with an EMA target
      frozen = dict(frozen, ema=state.ema)
    if accum == 1:
      (loss, metrics), grads = grad_fn(state.params, frozen, batch, rng, state.step)
    else:
      def micro(carry, xs):
        i, mb = xs
        (l, m), g = grad_fn(state.params, frozen, mb, jax.random.fold_in(rng, i), state.step)
        return jax.tree.map(jnp.add, carry, (l, m, g)), None
      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          lambda: grad_fn(state.params, frozen, jax.tree.map(lambda x: x[: x.shape[0] // accum], batch),
                          rng, state.step)))
      zeros = (zeros[0][0], zeros[0][1], zeros[1])
      (loss, metrics, grads), _ = jax.lax.scan(micro, zeros, (jnp.arange(accum), _split_micro(batch, accum)))
      loss, metrics, grads = jax.tree.map(lambda x: x / accum, (loss, metrics, grads))

    grad_norm = optim_global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = jax.tree.map(lambda p, u: p + u, state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    params, opt_state = keep(new_params, state.params), keep(new_opt, state.opt_state)
    new_ema = state.ema
    if state.ema is not None:
      new_ema = keep(ema.update(state.ema, params, ema.ema_decay(ema_cfg, state.step + 1)), state.ema)
    streak = jnp.where(finite, 0, state.nan_streak + 1)
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=new_ema,
                          nan_streak=streak, nan_total=state.nan_total + (~finite).astype(jnp.int32))
    metrics = dict(metrics, grad_norm=grad_norm, skipped=(~finite).astype(jnp.float32))
    return state, metrics

  return update


def build_state(plan, recipe, tx, params, rng, *, use_ema: bool) -> TrainState:
  """The TrainState of `params`: optimizer state, EMA and, for recipes with more networks (SF-DMD's critic and
  its optimizer), `recipe.init_extra(rng, params, recipe.extra_inputs())` in TrainState.extra, all computed by
  one jit straight onto the plan's shardings (`parallel.build`). Built in pieces, each piece's buffers freed
  after the copy leave holes in the GPU allocator: SF-DMD at 9 frames on one H100 then found no contiguous
  19 GiB for its step with more than that free. plan=None: a plain call (inside a trace, or on one device)."""
  has_extra = hasattr(recipe, "init_extra")

  def create(params, inputs, rng):
    extra = recipe.init_extra(rng, params, inputs) if has_extra else None
    return TrainState.create(params, tx, use_ema=use_ema, extra=extra)

  inputs = recipe.extra_inputs() if has_extra else None
  return create(params, inputs, rng) if plan is None else parallel.build(plan, create, params, inputs, rng)


def optim_global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


class _StopFlag:
  """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits cleanly at the next step."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    for s in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[s] = signal.signal(s, self._handle)
      except ValueError:  # not the main thread (e.g. inside a test runner thread)
        pass
    return self

  def _handle(self, signum, frame):
    if self.signum is not None:   # a second signal: stop now
      raise KeyboardInterrupt
    self.signum = signum

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)


def train(config, workdir: str, *, data_root: str | None = None) -> dict[str, Any]:
  """Train one stage; resumes from workdir's latest checkpoint; returns the final metrics."""
  # ---------------------------------------------------------------- config, workdir, data
  setup_lib.validate(config)
  checkpoint.guard_workdir(config, workdir)
  world = setup_lib.make_world(config)
  data_root = data_root or os.path.join(workdir, "data")
  train_path = setup_lib.ensure_data(config, world, data_root, split="train")

  # ---------------------------------------------------------------- model, recipe, state
  probe = setup_lib.first_batch(config, world, train_path)
  model = setup_lib.make_model(config, world)
  recipe = recipes.get_recipe(config.recipe)(config, model)
  tx = optim.make_optimizer(config.optim)
  root_rng = jax.random.key(config.seed)
  init_rng, train_rng, sample_rng = jax.random.split(root_rng, 3)
  if config.get("init_from"):
    params, from_step = checkpoint.load_params(config.init_from, use_ema=config.init_from_ema)
    print(f"Initialised from {config.init_from} (step {from_step}).", flush=True)
    setup_lib.check_params_match(params, jax.eval_shape(recipe.init_params, init_rng, probe), config.init_from)
  else:
    params = recipe.init_params(init_rng, probe)
  plan = parallel.plan_from_config(config)   # mesh + sharding rules; one device: everything in place
  state = build_state(plan, recipe, tx, params, init_rng, use_ema=config.ema.kind != "none")
  mngr = checkpoint.manager(os.path.join(workdir, "ckpt"), keep=config.train.keep,
                            save_every=config.train.ckpt_every)
  state, restored = checkpoint.restore(mngr, state)
  start = int(state.step)
  if restored is not None:
    print(f"Resumed from step {start} in {workdir}.", flush=True)
  num_steps = config.train.num_steps
  n_params = sum(x.size for x in jax.tree.leaves(state.params))

  # ---------------------------------------------------------------- the update
  # A recipe with its own `update(state, frozen, batch, rng)` (SF-DMD: critic + student, NaN guard, EMA) replaces
  # the generic single-network update.
  update_fn = recipe.update if hasattr(recipe, "update") else make_update(recipe, tx, config)
  update = parallel.jit_update(plan, update_fn, state)
  frozen = parallel.place(plan, recipe.frozen_params())
  batches = setup_lib.batches(config, world, train_path, start_step=start)
  profile = setup_lib.profile_window(config.train.get("profile", ""))
  writer = Writer(workdir)   # after every check above: a refused stage leaves no open event file behind

  # ---------------------------------------------------------------- the loop
  t0, last = time.time(), {}
  bar = tqdm(total=num_steps, initial=start, desc=f"train[{config.recipe}] {os.path.basename(workdir)}",
             unit="step", dynamic_ncols=True, disable=not config.train.get("progress", True)
             or jax.process_index() != 0)
  with _StopFlag() as stop:
    for step in range(start, num_steps):
      if profile and step == profile[0]:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
      batch = parallel.global_batch(plan, next(batches))
      state, metrics = update(state, frozen, batch, jax.random.fold_in(train_rng, step))
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if profile and step + 1 == profile[1]:
        jax.profiler.stop_trace()
      last = metrics
      if int(state.nan_streak) >= config.train.nan_patience:
        mngr.wait_until_finished()
        writer.close()
        raise TrainingDiverged(
            f"{int(state.nan_streak)} updates in a row had a non-finite loss or gradient (step {step}); the "
            f"last good checkpoint in {workdir}/ckpt is intact. Lower optim.lr, use model.dtype=float32, "
            f"or raise train.nan_patience.")
      if (step + 1) % config.train.log_every == 0 or step + 1 == num_steps:
        writer.scalars(step + 1, metrics)
      bar.update(1)
      bar.set_postfix(loss=f"{metrics['loss']:.4f}", skipped=int(state.nan_total))
      checkpoint.save(mngr, step + 1, state)
      if stop.signum is not None:
        checkpoint.save(mngr, step + 1, state, force=True)
        mngr.wait_until_finished()
        bar.close()
        logging.warning("Signal %d: saved step %d to %s; run the same command to resume.",
                        stop.signum, step + 1, workdir)
        return {"interrupted_at": step + 1}
  bar.close()
  if mngr.latest_step() != int(state.step):
    checkpoint.save(mngr, int(state.step), state, force=True)
  mngr.wait_until_finished()
  mngr.close()

  # ---------------------------------------------------------------- samples, metrics
  result = {"step": int(state.step), "params": int(n_params), "nan_skipped": int(state.nan_total),
            "train_seconds_this_run": round(time.time() - t0, 2), **{f"final_{k}": v for k, v in last.items()}}
  if config.train.get("sample_at_end", True) and jax.process_index() == 0:
    videos = setup_lib.sample_videos(config, model, state.ema if state.ema is not None else state.params,
                                     probe, sample_rng, num=min(8, probe["video"].shape[0]))
    writer.video(int(state.step), "samples", videos)
    result["samples"] = write_video(os.path.join(workdir, "samples", f"step_{int(state.step)}.gif"), videos)
  writer.close()
  write_metrics(workdir, result)
  return result
