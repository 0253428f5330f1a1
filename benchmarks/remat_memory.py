"""Compiled memory of one training update per remat policy (none, full, dots_saveable, attention_only).

  python benchmarks/remat_memory.py                                   # CPU, toy model (configs/toy/teacher.py)
  python benchmarks/remat_memory.py --recipe tf --scan_layers         # teacher forcing: the packed 2x sequence
  python benchmarks/remat_memory.py --video 1,21,60,104,16 --set data.world.channels=16 \
      --set model.dim=1536 --set model.num_heads=12 --set model.num_layers=30 --set model.ffn_dim=8960 \
      --set model.text_dim=4096 --set model.freq_dim=256 --set model.patch_size=1,2,2 \
      --set model.dtype=bfloat16 --recipe tf --scan_layers --out $OUT   # Wan2.1-1.3B shape, on the GPU

Nothing is run and no weights are made: the state and the batch are abstract (`jax.eval_shape`), the update is
the trainer's own (`trainer.make_update`, jitted as the trainer does), and the numbers are XLA's
`compile().memory_analysis()` (temp = activations kept for the backward pass plus scratch). On CPU the XLA
scheduler differs from the GPU's, so compare policies with each other, never CPU bytes with GPU bytes.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from rcm_jax import parallel, recipes  # noqa: E402
from rcm_jax.models.config import REMAT_POLICIES  # noqa: E402
from rcm_jax.training import optim, setup, trainer  # noqa: E402
from rcm_jax.training.state import TrainState  # noqa: E402

FIELDS = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
          "generated_code_size_in_bytes", "peak_memory_in_bytes")


def load_config(path: str, arg: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def apply_override(config, item: str):
  """'model.patch_size=1,2,2' -> config.model.patch_size = (1, 2, 2), typed like the current value."""
  key, _, value = item.partition("=")
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  old = node[leaf]
  if isinstance(old, (tuple, list)):
    node[leaf] = tuple(type(old[0])(v) for v in value.split(","))
  elif isinstance(old, bool):
    node[leaf] = value.lower() in ("1", "true", "yes")
  else:
    node[leaf] = type(old)(value)


def abstract_batch(config, world, video_shape):
  """Shapes of one global batch: the world's condition keys at the given video shape."""
  probe = setup.prepare(world, world.generate(2, 0, "train"))
  b = video_shape[0]
  like = lambda x: jax.ShapeDtypeStruct((b,) + x.shape[1:], x.dtype)
  return {"video": jax.ShapeDtypeStruct(tuple(video_shape), jnp.float32),
          "cond": jax.tree.map(like, probe["cond"]), "null": jax.tree.map(like, probe["null"])}


def measure(config, world, video_shape, policy: str) -> dict:
  config.model.remat_policy = policy
  model = setup.make_model(config, world)
  recipe = recipes.get_recipe(config.recipe)(config, model)
  tx = optim.make_optimizer(config.optim)
  batch = abstract_batch(config, world, video_shape)
  state = jax.eval_shape(lambda b: TrainState.create(recipe.init_params(jax.random.key(0), b), tx,
                                                    use_ema=config.ema.kind != "none"), batch)
  plan = parallel.plan_from_config(config)
  shardings = parallel.shardings(plan, state)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  update = parallel.jit_update(plan, trainer.make_update(recipe, tx, config), state)
  t0 = time.time()
  compiled = update.lower(state, recipe.frozen_params(), batch, jax.random.key(1)).compile()
  stats = compiled.memory_analysis()
  out = {k: int(getattr(stats, k)) for k in FIELDS if stats is not None and hasattr(stats, k)}
  out["compile_s"] = round(time.time() - t0, 1)
  out["params"] = int(sum(x.size for x in jax.tree.leaves(state.params)))
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="configs/toy/teacher.py")
  ap.add_argument("--arg", default="")
  ap.add_argument("--recipe", default="rf", help="rf (bidirectional) or a causal recipe such as tf")
  ap.add_argument("--video", default="", help="B,T,H,W,C of the global batch (default: train.batch_size and "
                                              "the world's video shape)")
  ap.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
  ap.add_argument("--scan_layers", action="store_true")
  ap.add_argument("--policies", default=",".join(REMAT_POLICIES))
  ap.add_argument("--out", default="")
  args = ap.parse_args()

  config = load_config(args.config, args.arg)
  config.recipe = args.recipe
  config.model.scan_layers = args.scan_layers
  for item in args.set:
    apply_override(config, item)
  world = setup.make_world(config)
  if args.video:
    video_shape = tuple(int(v) for v in args.video.split(","))
  else:
    video_shape = (config.train.batch_size,) + world.generate(1, 0, "train")["video"].shape[1:]
  print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()} | recipe {config.recipe} | video "
        f"{video_shape} | model dim {config.model.dim}, {config.model.num_layers} layers, scan_layers "
        f"{config.model.scan_layers}, dtype {config.model.dtype}", flush=True)
  rows = {}
  for policy in args.policies.split(","):
    rows[policy] = r = measure(config, world, video_shape, policy)
    mib = lambda k: f"{r[k] / 2**20:9.2f}" if k in r else "      n/a"
    print(f"{policy:15s} temp {mib('temp_size_in_bytes')} MiB | args {mib('argument_size_in_bytes')} MiB | "
          f"out {mib('output_size_in_bytes')} MiB | alias {mib('alias_size_in_bytes')} MiB | "
          f"peak {mib('peak_memory_in_bytes')} MiB | compile {r['compile_s']} s", flush=True)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "remat_memory.json"), "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "recipe": config.recipe, "video": video_shape,
                 "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
