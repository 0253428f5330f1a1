"""Shared set-up for every job: config validation, world and data, model construction, sampling.

The train, sample and eval jobs and the recipe runner all build their pieces here, so a stage's
model is constructed the same way wherever its checkpoint is read.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from rcm_jax.data import pipeline as pipeline_lib
from rcm_jax.data import records as records_lib
from rcm_jax.data import worlds as worlds_lib
from rcm_jax.errors import UserError
from rcm_jax import models as models_lib
from rcm_jax import parallel
from rcm_jax import recipes
from rcm_jax.inference import bidirectional
from rcm_jax.training import ema as ema_lib
from rcm_jax.training import optim


class ConfigError(UserError):
  pass


DATA_SOURCES = ("real", "teacher")


def validate(config) -> None:
  """Checks that need no compute; each error names the config key and the fix."""
  recipes.get_recipe(config.recipe)
  try:
    worlds_lib.get_world(config.world, dict(config.data.world))
  except (ValueError, TypeError) as e:
    raise ConfigError(f"world={config.world!r} / data.world: {e}") from None
  source = config.data.get("source", "real")
  if source not in DATA_SOURCES:
    raise ConfigError(f"data.source={source!r}: choose one of {DATA_SOURCES}.")
  if source == "teacher" and not config.data.get("teacher_from"):
    raise ConfigError("data.source='teacher' needs data.teacher_from: the generate stage (in a recipe), its "
                      "workdir, or the dataset directory it wrote.")
  if config.ema.kind not in ema_lib.EMA_KINDS:
    raise ConfigError(f"ema.kind={config.ema.kind!r}: choose one of {ema_lib.EMA_KINDS}.")
  if config.ema.kind == "power":
    ema_lib.std_to_gamma(config.ema.std)
  t = config.train
  if t.batch_size % (t.grad_accum * jax.process_count()):
    raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum} "
                      f"times the process count {jax.process_count()}.")
  for key in ("num_steps", "log_every", "ckpt_every", "keep", "nan_patience", "batch_size"):
    if t[key] < 1:
      raise ConfigError(f"train.{key} must be >= 1, got {t[key]}.")
  try:
    optim.make_optimizer(config.optim)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  configure_jax(config)
  try:
    model = make_model(config)
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from None
  parallel.check_config(config, num_tokens=num_tokens(config, model))


def num_tokens(config, model) -> int:
  """Tokens of one training video through the model's patchify: F/pt * H/ph * W/pw."""
  t, h, w = make_world(config).generate(1, 0, "train")["video"].shape[1:4]
  pt, ph, pw = model.config.patch_size
  return (t // pt) * (h // ph) * (w // pw)


def configure_jax(config) -> None:
  """Process-wide JAX flags a config needs: hijax primitives (the Pallas attention) under remat need remat3."""
  if config.model.attention_impl == "pallas":
    jax.config.update("jax_remat3", True)
    if any(int(n) != 1 for n in dict(config.get("mesh", {"data": -1})).values()):
      # Under a mesh the kernel runs inside shard_map (rcm_jax.models.attention). jax 0.11.2 (the GPU stack)
      # loses the kernel's hoisted constants from a shard_map's in_specs when it prunes a step whose shard_map
      # sits in the layer scan (AssertionError in partition_list: seen on 2 H100s with context=2, reproduced on
      # CPU with fsdp=2 and context=2); the simplified constant handling avoids it. jax 0.12 works either way.
      jax.config.update("jax_use_simplified_jaxpr_constants", True)


def make_world(config):
  return worlds_lib.get_world(config.world, dict(config.data.world))


def ensure_data(config, world, root: str, *, split: str, source: str | None = None) -> str:
  """The dataset dir of a split: the world's own, or the teacher samples for "train" with data.source="teacher"."""
  if split == "train" and (source or config.data.get("source", "real")) == "teacher":
    return teacher_data(config, world)
  n = config.data.num_train_videos if split == "train" else config.data.num_eval_videos
  return records_lib.ensure_dataset(config.world, dict(config.data.world), n, config.data.seed, split, root)


def teacher_data(config, world) -> str:
  """data.teacher_from (a dataset dir, or a finished generate job's workdir) -> the dataset dir, checked."""
  ref = config.data.get("teacher_from", "")
  if not ref:
    raise ConfigError("data.source='teacher' needs data.teacher_from: the generate stage (in a recipe), its "
                      "workdir, or the dataset directory it wrote.")
  path = ref
  if not os.path.exists(os.path.join(ref, records_lib.MANIFEST)):
    metrics = os.path.join(ref, "metrics.json")
    if os.path.exists(metrics):
      with open(metrics) as f:
        path = json.load(f).get("dataset", "")
    if not path or not os.path.exists(os.path.join(path, records_lib.MANIFEST)):
      raise ConfigError(f"data.teacher_from={ref!r}: no finished teacher dataset there (neither its manifest.json "
                        "nor a generate job's metrics.json); run the generate job first, or point "
                        "data.teacher_from at its workdir or dataset directory.")
  manifest = records_lib.read_manifest(path)
  want = {"world": config.world, "config": worlds_lib.world_config_dict(world)}
  diff = records_lib.first_difference(manifest, want)
  if diff:
    raise records_lib.DatasetMismatchError(
        f"data.teacher_from={ref!r}: the teacher dataset {path} was generated for another world ({diff}); "
        "generate one for this config.world / data.world.")
  return path


def prepare(world, batch: dict) -> dict:
  """A raw numpy batch -> what recipes take: video, the model's condition kwargs, and their null form."""
  return {"video": np.asarray(batch["video"], np.float32), "cond": world.model_inputs(batch),
          "null": world.null_inputs(batch)}


def batches(config, world, path: str, *, start_step: int = 0):
  it = pipeline_lib.make_batches(path, config.train.batch_size, config.data.seed, start_step=start_step,
                                 process_index=jax.process_index(), process_count=jax.process_count())
  for b in it:
    yield prepare(world, b)


def first_batch(config, world, path: str) -> dict:
  return next(batches(config, world, path))


def world_model_fields(world) -> dict:
  """The model fields a world fixes: latent channels and how its conditions enter the network."""
  probe = world.generate(1, 0, "train")
  inputs = world.model_inputs(probe)
  channels = probe["video"].shape[-1]
  return dict(in_channels=channels, out_channels=channels,
              num_classes=world.num_classes if "labels" in inputs else 0,
              num_actions=world.num_actions if "actions" in inputs else 0,
              cond_channels=inputs["y"].shape[-1] if "y" in inputs else 0)


def make_model(config, world=None):
  world = world or make_world(config)
  fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(config.model).items() if k != "size"}
  fields.update(world_model_fields(world))
  return models_lib.build_model(config.model.size, **fields)


def check_params_match(params, abstract, source: str) -> None:
  """init_from params must have the tree and shapes this stage's model expects."""
  got = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
  missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  if missing or unexpected:
    raise ConfigError(f"init_from={source}: its params do not fit this model (missing {missing[:5]}, "
                      f"unexpected {unexpected[:5]}); the stages must share config.model and config.data.")
  for k in want:
    if tuple(want[k]) != tuple(got[k]):
      raise ConfigError(f"init_from={source}: param {k} has shape {tuple(got[k])}, this model wants "
                        f"{tuple(want[k])}; the stages must share config.model and config.data.")


def profile_window(spec: str):
  """'start:end' -> (start, end) steps to trace with jax.profiler; '' -> None."""
  if not spec:
    return None
  try:
    a, b = (int(x) for x in spec.split(":"))
  except ValueError:
    raise ConfigError(f"train.profile={spec!r}: write 'start:end', e.g. '10:15'.") from None
  return (a, b)


def sample_videos(config, model, params, batch: dict, rng, *, num: int, num_steps: int | None = None,
                  cfg_scale: float | None = None):
  """Bidirectional samples for the first `num` conditions of `batch`: [num, T, H, W, C] numpy."""
  take = lambda tree: jax.tree.map(lambda x: jnp.asarray(x[:num]), tree)
  noise = jax.random.normal(rng, batch["video"][:num].shape, jnp.float32)
  out = bidirectional.sample(model, params, noise, take(batch["cond"]), take(batch["null"]),
                             num_steps=num_steps or config.sample.steps,
                             cfg_scale=float(config.sample.cfg_scale if cfg_scale is None else cfg_scale),
                             shift=float(config.sample.shift))
  return np.asarray(out)
