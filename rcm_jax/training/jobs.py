"""The sample and eval jobs: draw videos from a trained stage and score them against ground truth.

`eval` reports each sampler setting beside the calibration rows: the ceiling (held-out real videos)
and the floor (an untrained model of the same config), so a reader sees where a model sits.
"""
from __future__ import annotations

import functools
import os
import time

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from rcm_jax import evaluation
from rcm_jax.data import pipeline as pipeline_lib
from rcm_jax.errors import UserError
from rcm_jax.inference import causal_sample
from rcm_jax.training import checkpoint
from rcm_jax.training import setup as setup_lib
from rcm_jax.training.writer import write_metrics, write_video


def _source_params(config, workdir: str, key: str):
  src = config[key].checkpoint or workdir
  params, step = checkpoint.load_params(src, use_ema=config[key].use_ema)
  logging.info("Loaded params of %s (step %d).", src, step)
  return params, src


def _eval_batch(config, world, data_root: str, num: int):
  path = setup_lib.ensure_data(config, world, data_root, split="test")
  raw = pipeline_lib.load_all(path)
  raw = {k: v[:num] for k, v in raw.items()}
  return raw, setup_lib.prepare(world, raw)


SAMPLERS = ("bidirectional", "causal", "rollout")   # rollout: causal with a KV cache (inference/rollout.py)


def sampler_for(config, job: str):
  """The sampling function a job's config names: bidirectional Euler, or causal chunk by chunk."""
  name = config[job].get("sampler", "bidirectional")
  if name not in SAMPLERS:
    raise UserError(f"{job}.sampler={name!r}: choose one of {SAMPLERS}.")
  if name == "causal":
    return functools.partial(causal_sample.sample_videos, job=job)
  if name == "rollout":
    from rcm_jax.inference import rollout
    return functools.partial(rollout.sample_videos, job=job)
  return setup_lib.sample_videos


def nfe_label(config, job: str, steps: int) -> str:
  """Network evaluations of one sample: per video (bidirectional), per chunk (causal samplers).

  CFG doubles every call. The KV-cache rollout with clean context adds a t=0 pass per chunk to write the cache
  (noisy context reuses the last step's K/V); the cache-free causal sampler re-encodes the context inside each
  call, so it needs no extra pass."""
  sampler = config[job].get("sampler", "bidirectional")
  cfg = 2 if config[job].get("cfg_scale", 1.0) != 1 else 1
  if sampler == "bidirectional":
    return f"NFE {steps * cfg}"
  if sampler == "rollout" and not config[job].get("noisy_context", False):
    return f"NFE {steps * cfg}+1 per chunk"
  return f"NFE {steps * cfg} per chunk"


def _sample_all(config, model, params, batch, rng, *, num_steps, cfg_scale, chunk: int, desc: str,
                job: str = "eval"):
  sample_fn = sampler_for(config, job)
  n = batch["video"].shape[0]
  out = []
  for i in tqdm(range(0, n, chunk), desc=desc, unit="batch", leave=False, disable=jax.process_index() != 0):
    part = jax.tree.map(lambda x: x[i:i + chunk], batch)
    out.append(sample_fn(config, model, params, part, jax.random.fold_in(rng, i),
                         num=part["video"].shape[0], num_steps=num_steps, cfg_scale=cfg_scale))
  return np.concatenate(out)


def _prepare_job(config, workdir: str, data_root: str | None, job: str):
  """What the sample and eval jobs both need: the world, the model, the source params, held-out conditions."""
  setup_lib.validate(config)
  world = setup_lib.make_world(config)
  params, src = _source_params(config, workdir, job)
  raw, batch = _eval_batch(config, world, data_root or os.path.join(workdir, "data"), config[job].num_videos)
  return world, setup_lib.make_model(config, world), params, src, raw, batch


def sample(config, workdir: str, *, data_root: str | None = None) -> dict:
  """Sample videos for held-out conditions from the stage at config.sample.checkpoint (or workdir)."""
  if config.get("pipeline") == "wan_t2v":   # Wan2.1 text-to-video (configs/wan2p1/): its own job
    from rcm_jax.interop import t2v
    return t2v.sample(config, workdir)
  prepared = _prepare_job(config, workdir, data_root, "sample")
  if config.sample.get("sampler") == "rollout":   # causal students stream chunk by chunk, written as they come
    from rcm_jax.play import stream_job
    return stream_job.sample_stream(config, workdir, prepared)
  world, model, params, src, raw, batch = prepared
  videos = _sample_all(config, model, params, batch, jax.random.key(config.seed + 1),
                       num_steps=config.sample.steps, cfg_scale=config.sample.cfg_scale,
                       chunk=config.sample.batch_size, desc="sample", job="sample")
  os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
  np.savez_compressed(os.path.join(workdir, "samples", "samples.npz"), videos=videos,
                      **{k: v for k, v in raw.items() if k != "video"})
  gif = write_video(os.path.join(workdir, "samples", f"samples_{config.sample.steps}step.gif"), videos[:16])
  mp4 = write_video(os.path.join(workdir, "samples", f"samples_{config.sample.steps}step.mp4"), videos[:16])
  result = {"source": src, "num_videos": int(videos.shape[0]), "steps": config.sample.steps,
            "cfg_scale": config.sample.cfg_scale, "gif": gif, "mp4": mp4}
  write_metrics(workdir, result)
  return result


def evaluate(config, workdir: str, *, data_root: str | None = None) -> dict:
  """Score the stage at config.eval.checkpoint for each of config.eval.steps, with ceiling and floor."""
  world, model, params, src, raw, batch = _prepare_job(config, workdir, data_root, "eval")
  rng = jax.random.key(config.seed + 2)
  samples_dir = os.path.join(workdir, "samples")
  rows, meta = {}, {k: v for k, v in raw.items()}

  untrained = jax.jit(model.init)(jax.random.key(config.seed + 3), batch["video"][:1],
                                  np.zeros(batch["video"][:1].shape[:2], np.float32),
                                  **jax.tree.map(lambda x: x[:1], batch["cond"]))
  floor_videos = _sample_all(config, model, untrained, batch, rng, num_steps=min(config.eval.steps),
                             cfg_scale=config.eval.cfg_scale, chunk=config.eval.batch_size, desc="floor")
  calibration = evaluation.calibrate(world, meta=meta, real=raw["video"], floor=floor_videos, seed=config.seed)
  speed = {}
  for steps in config.eval.steps:
    sample = functools.partial(_sample_all, config, model, params, batch, rng, num_steps=steps,
                               cfg_scale=config.eval.cfg_scale, chunk=config.eval.batch_size,
                               desc=f"eval {steps}-step")
    videos = sample()
    row = f"{config.eval.label} {steps}-step ({nfe_label(config, 'eval', steps)})"
    rows[row] = evaluation.evaluate(world, videos, meta)
    if config.eval.get("timing", True):   # a second, compiled pass: samples/s without compilation
      t0 = time.perf_counter()
      jax.block_until_ready(sample())
      speed[row] = videos.shape[0] / (time.perf_counter() - t0)
    write_video(os.path.join(samples_dir, f"eval_{steps}step.gif"), videos[:16])
  write_video(os.path.join(samples_dir, "real.gif"), raw["video"][:16])
  write_video(os.path.join(samples_dir, "untrained.gif"), floor_videos[:16])
  table = evaluation.format_table(rows, calibration)
  if speed:
    table += f"\n\nSampling speed ({jax.devices()[0].device_kind}, {config.eval.batch_size} videos a call, " \
             "compiled):\n" + "\n".join(f"- {r}: {v:.1f} samples/s" for r, v in speed.items())
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(table + "\n")
  plot = _plot_vs_steps(config, rows, calibration, os.path.join(workdir, "metrics_vs_steps.png"))
  print(table)
  result = {"source": src, "rows": rows, "calibration": calibration, "samples_per_s": speed,
            "table": os.path.join(workdir, "table.md"),
            "plot": plot, "samples": samples_dir}
  write_metrics(workdir, result)
  return result


def _plot_vs_steps(config, rows: dict, calibration: dict, path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(next(iter(rows.values())).keys())
  fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
  steps = list(config.eval.steps)
  for ax, name in zip(axes[0], names):
    ax.plot(steps, [r[name] for r in rows.values()], "o-", label=config.eval.label)
    for cal, style in (("ceiling", "g--"), ("floor", "r:")):
      if cal in calibration and name in calibration[cal]:
        ax.axhline(calibration[cal][name], color=style[0], linestyle=style[1:], label=cal)
    ax.set_xscale("log")
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xlabel("sampling steps")
    ax.set_title(name, fontsize=9)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
