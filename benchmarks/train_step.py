"""One training update of each Causal-rCM stage at the Wan2.1-1.3B shape: TF diffusion, TF-dCM, TF-sCM, SF-DMD.

  python3 benchmarks/train_step.py --out $OUT                        # one H100: 21 latent frames at 480p
  python3 benchmarks/train_step.py --out $OUT --remat full --frames 21 --recipes tf,tf_scm
  python3 benchmarks/train_step.py --out $OUT --mesh fsdp=2 --batch 2 --recipes tf_scm,sf_dmd   # 2 GPUs, FSDP
  python3 benchmarks/train_step.py --out $OUT --mesh context=2 --recipes tf_scm                 # 2 GPUs, Ulysses
  .venv/bin/python benchmarks/train_step.py --tiny --out /tmp/ts    # CPU: the same code paths, tiny shapes

What is timed is the code users run: each recipe comes from `rcm_jax.recipes`' registry, its update is the
trainer's (`trainer.make_update`, or the recipe's own `update` for SF-DMD: critic steps + student step), placed
and jitted by `rcm_jax.parallel` exactly as `trainer.train` does, on the mesh of `--mesh` (default: one device,
data=1; e.g. `fsdp=2` or `context=2`, the other axes 1; the mesh takes every visible device). Random weights
(fp32 master params, AdamW state and a power EMA, as in training), bf16 compute, Pallas flash attention, layers
under `nn.scan`, the remat policy of `--remat`. The batch: one video of `--frames` latent frames of 60 x 104 x 16
(480p: 1560 tokens per frame after the 1x2x2 patchify) and 512 random umT5-sized text tokens; the causal pattern
is chunk-wise c3-3 (`--chunk`). Teacher-forcing stages run the packed [clean | noisy] sequence (2 x frames x
1560 tokens); TF-dCM / TF-sCM read a causal teacher, SF-DMD a bidirectional one (CFG 2 calls) and a critic; SF-DMD runs
with replayed backprop (`dmd.replay_backprop`: one KV cache kept for the backward pass, not one per chunk)
unless `--no_replay`.

Per recipe: median step time over `--iters` steps after two warm-up steps (SF-DMD: whole cycles of its exit
steps), tokens/s (the video's latent tokens per second), model FLOPs counted analytically (`model_flops`:
every network call the recipe makes, matmuls only, attention at its mask's density, backward = 2 x forward,
JVP = 2 x the linear layers + 3 x the attention, remat recomputation NOT counted) and MFU against the
H100 SXM bf16 dense peak of 989 TFLOP/s (`--peak_tflops`) times the number of devices; tokens/s is also given
per device. Memory: XLA's compiled memory analysis of the update (per device), and the largest peak bytes in use
over the devices after the recipe (a running maximum over the recipes run so far).
If a recipe runs out of memory the script retries it with fewer frames (`--min_frames`) and says so.
Writes train_step.json and train_step.md under --out, with the issue's targets beside the results.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rcm_jax.training.optim import MU_DTYPES  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0
RECIPES = ("tf", "tf_dcm", "tf_scm", "sf_dmd")
TARGETS = {"tf_mfu": 0.40, "scm_over_dcm": 1.3}


# ------------------------------------------------------------------------------------------ set-up
def load_config(path: str, arg: str | None = None):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def shapes(args) -> dict:
  """Model fields and the batch geometry of the run (Wan2.1-1.3B at 480p, or the CPU-sized --tiny)."""
  if args.tiny:
    model = dict(dim=48, num_heads=4, num_layers=2, ffn_dim=96, in_channels=4, out_channels=4, text_dim=16,
                 freq_dim=32, patch_size=(1, 2, 2), dtype="float32", attention_impl="xla")
    return dict(model=model, size="tiny", height=8, width=8, channels=4, text_tokens=8)
  model = dict(dim=1536, num_heads=12, num_layers=args.layers or 30, ffn_dim=8960, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, patch_size=(1, 2, 2), dtype="bfloat16", attention_impl="pallas")
  height, width = args.latent_hw or (60, 104)
  return dict(model=model, size="wan_1p3b", height=height, width=width, channels=16, text_tokens=512)


def make_config(args, geo, recipe: str, frames: int):
  """The toy causal config with the model, pattern and recipe sections of this benchmark."""
  c = load_config("configs/toy/causal.py")
  c.recipe = recipe
  c.model.size = geo["size"]
  for k, v in geo["model"].items():
    c.model[k] = v
  c.model.scan_layers = True
  c.model.remat_policy = args.remat
  c.mesh = dict(args.mesh)
  c.data.world = dict(c.data.world, frames=frames)
  first, chunk = args.chunk
  c.causal.first_chunk_frames, c.causal.chunk_frames = first, chunk
  c.train.batch_size = args.batch
  c.optim.warmup_steps = 0
  c.teacher.kind = "bidirectional" if recipe == "sf_dmd" else "causal"
  c.teacher.cfg_scale = 2.0                                 # != 1: guided teacher (2 calls), as in training
  c.scm.warmup_steps = 100
  c.scm.max_xla_tokens = 10**9 if args.tiny else c.scm.max_xla_tokens
  c.dmd = dict(schedule=(1600 / 1601, 15 / 16, 5 / 6, 5 / 8, 0.0), critic_steps=args.critic_steps, time_shift=5.0,
               noisy_context=False, cache_keys="post_rope", cache_frames=0, replay_backprop=not args.no_replay)
  c.optim_critic = dict(lr=4e-7, b1=0.0, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0,
                        mu_dtype=args.mu_dtype)
  c.optim.mu_dtype = args.mu_dtype
  return c


def make_batch(geo, batch: int, frames: int, seed: int = 0) -> dict:
  r = np.random.default_rng(seed)
  video = r.uniform(-1, 1, (batch, frames, geo["height"], geo["width"], geo["channels"])).astype(np.float32)
  text_dim = geo["model"]["text_dim"]
  ctx = r.standard_normal((batch, geo["text_tokens"], text_dim)).astype(np.float32)
  return {"video": video, "cond": {"context": ctx}, "null": {"context": np.zeros_like(ctx)}}


# ------------------------------------------------------------------------------------------ FLOPs
def forward_flops(mcfg, n_q: int, attn_pairs: float, n_ctx: int, *, jvp: bool = False) -> float:
  """Matmul FLOPs of one network call: n_q query tokens, attn_pairs attended (query, key) pairs per head-set,
  n_ctx text tokens. jvp: primal + tangent (linear layers 2x, attention 3x: six matmuls per tile, not two)."""
  d, f, layers = mcfg.dim, mcfg.ffn_dim, mcfg.num_layers
  patch = math.prod(mcfg.patch_size)
  linear = layers * (2 * n_q * d * d * 4                  # self-attention q, k, v, out
                     + 2 * n_q * d * d * 2                 # cross-attention q, out
                     + 2 * n_ctx * d * d * 2               # cross-attention k, v of the text tokens
                     + 2 * n_q * d * f * 2)                # feed-forward
  linear += 2 * n_q * patch * mcfg.in_channels * d + 2 * n_q * d * patch * mcfg.out_channels
  linear += 2 * n_ctx * (mcfg.text_dim * d + d * d)        # text projection
  attention = layers * (4 * attn_pairs * d + 4 * n_q * n_ctx * d)
  return (2 * linear + 3 * attention) if jvp else (linear + attention)


def model_flops(recipe, mcfg, frames: int, tpf: int, n_ctx: int, batch: int, step: int) -> dict:
  """Model FLOPs of one update of `recipe` at training step `step` (SF-DMD's exit step depends on it)."""
  from rcm_jax.recipes import causal
  pattern = recipe.pattern
  fwd = lambda n, pairs, jvp=False: batch * forward_flops(mcfg, n, pairs, n_ctx, jvp=jvp)
  n_tf = 2 * frames * tpf
  tf_mask = causal._tf_mask(pattern, frames, tpf)
  f_tf = fwd(n_tf, tf_mask.density() * n_tf * n_tf)
  name = recipe.name
  if name == "tf":
    calls = {"student fwd+bwd (packed)": 3 * f_tf}
  elif name == "tf_dcm":
    calls = {"teacher CFG 2 fwd (packed)": 2 * f_tf, "student target fwd": f_tf, "student fwd+bwd": 3 * f_tf}
  elif name == "tf_scm":
    calls = {"teacher CFG 2 fwd (packed)": 2 * f_tf,
             "student fwd+JVP": fwd(n_tf, tf_mask.density() * n_tf * n_tf, jvp=True),
             "student fwd+bwd": 3 * f_tf}
  elif name == "sf_dmd":
    n_b = frames * tpf
    f_b = fwd(n_b, n_b * n_b)                                         # bidirectional, full attention
    plan = recipe.plan(jax.ShapeDtypeStruct((batch, frames, 2 * tpf, 2, mcfg.in_channels), jnp.float32))
    exit_step = int(recipe.exit_step(step))

    def rollout(grad: bool) -> float:
      total = 0.0
      for i, (f0, f1) in enumerate(plan.blocks):
        m = plan.mask(i, tpf)
        n_q = (f1 - f0) * tpf
        f_chunk = fwd(n_q, m.density() * m.shape[0] * m.shape[1])
        total += (exit_step - 1) * f_chunk + (3 if grad else 1) * f_chunk
        if plan.writes[i] is not None:
          total += f_chunk                                            # clean-context cache write pass
      return total

    k = int(recipe.dmd.critic_steps)
    calls = {f"critic x{k}: rollout (no grad)": k * rollout(False), f"critic x{k}: fwd+bwd": k * 3 * f_b,
             "student rollout (grad at exit step)": rollout(True), "fake score fwd": f_b,
             "teacher CFG 2 fwd": 2 * f_b}
  else:
    raise ValueError(name)
  return {"total": float(sum(calls.values())), "calls": {k: float(v) for k, v in calls.items()}}


# ------------------------------------------------------------------------------------------ one recipe
def run_recipe(args, geo, name: str, frames: int) -> dict:
  from rcm_jax import parallel, recipes
  from rcm_jax.models import build_model
  from rcm_jax.training import optim, setup, trainer

  cfg = make_config(args, geo, name, frames)
  setup.configure_jax(cfg)                                  # remat3 for the Pallas kernel under remat
  fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(cfg.model).items() if k != "size"}
  model = build_model(geo["size"], **fields)
  mcfg = model.config
  batch_np = make_batch(geo, args.batch, frames)
  probe = jax.tree.map(jnp.asarray, batch_np)
  init = jax.jit(lambda rng: model.init(rng, probe["video"][:, :1], jnp.zeros((args.batch, 1)),
                                        context=probe["cond"]["context"][:, :1]))
  recipe_cls = recipes.get_recipe(name)
  make_recipe = lambda teacher: recipe_cls(cfg, model) if teacher is None else recipe_cls(cfg, model,
                                                                                        teacher_params=teacher)
  tx = optim.make_optimizer(cfg.optim)
  plan = parallel.plan_from_config(cfg)

  build_state = lambda plan, recipe, student: trainer.build_state(plan, recipe, tx, student, jax.random.key(2),
                                                                  use_ema=cfg.ema.kind != "none")
  if args.compile_only:   # shapes only: nothing the size of the model is allocated
    student = jax.eval_shape(init, jax.random.key(0))
    teacher = student if name != "tf" else None
    # traced teacher inside: the critic SF-DMD copies from it is then a shape too
    state = jax.eval_shape(lambda s, t: build_state(None, make_recipe(t), s), student, teacher)
    recipe = make_recipe(teacher)
  else:   # built already sharded (`parallel.build`): a whole copy placed later leaves holes in the allocator
    student = parallel.build(plan, init, jax.random.key(0))
    teacher = parallel.build(plan, init, jax.random.key(1)) if name != "tf" else None
    recipe = make_recipe(teacher)
    state = build_state(plan, recipe, student)
  del student
  update_fn = recipe.update if hasattr(recipe, "update") else trainer.make_update(recipe, tx, cfg)
  update = parallel.jit_update(plan, update_fn, state)
  if args.compile_only:   # shapes with the shardings `place` would give them (donation needs them to match)
    with_sharding = lambda tree: jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                              tree, parallel.shardings(plan, tree))
    state, frozen = with_sharding(state), with_sharding(recipe.frozen_params())
  else:
    frozen = parallel.place(plan, recipe.frozen_params())
  batch = parallel.global_batch(plan, batch_np)
  rng = jax.random.key(3)

  print(f"{name}: {frames} frames, compiling ...", flush=True)
  t0 = time.perf_counter()
  compiled = update.lower(state, frozen, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  print(f"{name}: compiled in {compile_s:.1f} s", flush=True)
  mem = compiled.memory_analysis()
  mem = {k: int(getattr(mem, k)) for k in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                                            "alias_size_in_bytes") if mem is not None and hasattr(mem, k)}
  if args.compile_only:
    nbytes = lambda tree: int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))
    return {"recipe": name, "frames": frames, "tokens_per_frame": tokens_per_frame(geo), "batch": args.batch,
            "compile_s": round(compile_s, 1), "compiled_memory_bytes": mem, "compile_only": True,
            "params_bytes": nbytes(state.params), "state_bytes": nbytes(state), "frozen_bytes": nbytes(frozen)}
  cycle = recipe.max_steps if name == "sf_dmd" else 1      # SF-DMD's exit step cycles through 1..max_steps
  iters = max(args.iters, cycle)
  iters = int(math.ceil(iters / cycle) * cycle)
  step_times, flops, losses = [], [], []
  for i in range(2 + iters):
    step = int(state.step)
    t0 = time.perf_counter()
    state, metrics = update(state, frozen, batch, jax.random.fold_in(rng, i))
    jax.block_until_ready((state, metrics))
    dt = time.perf_counter() - t0
    losses.append(float(metrics["loss"]))
    print(f"{name}: step {i} {dt * 1e3:.0f} ms{' (warm-up)' if i < 2 else ''}", flush=True)
    if i >= 2:
      step_times.append(dt)
      flops.append(model_flops(recipe, mcfg, frames, tokens_per_frame(geo), geo["text_tokens"], args.batch,
                               step)["total"])
  if args.profile:  # one more step, untimed, under the profiler: where the device time goes
    import profile_summary   # benchmarks/ is on sys.path (this script's directory)
    trace_dir = os.path.join(args.out, f"trace_{name}")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      state, metrics = update(state, frozen, batch, jax.random.fold_in(rng, 2 + iters))
      jax.block_until_ready((state, metrics))
    text = profile_summary.to_markdown(profile_summary.summarize(profile_summary.load_trace(trace_dir)), top=40)
    print(f"# profile of one {name} step ({trace_dir}):\n{text}", flush=True)
    with open(os.path.join(args.out, f"profile_{name}.md"), "w") as f:
      f.write(text)
  detail = model_flops(recipe, mcfg, frames, tokens_per_frame(geo), geo["text_tokens"], args.batch, 0)
  med = float(np.median(step_times))
  mean_flops = float(np.mean(flops))
  mean_time = float(np.mean(step_times))
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  ndev = jax.device_count()
  out = {"recipe": name, "frames": frames, "tokens_per_frame": tokens_per_frame(geo), "batch": args.batch,
         "video_tokens": args.batch * frames * tokens_per_frame(geo),
         "packed_tokens": 2 * frames * tokens_per_frame(geo) if name != "sf_dmd" else None,
         "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
         "compile_s": round(compile_s, 1), "iters": iters, "median_step_s": med, "min_step_s": min(step_times),
         "mean_step_s": mean_time, "tokens_per_s": args.batch * frames * tokens_per_frame(geo) / med,
         "tokens_per_s_per_device": args.batch * frames * tokens_per_frame(geo) / med / ndev, "devices": ndev,
         "mesh": {k: int(v) for k, v in plan.mesh.shape.items()},
         "model_tflop_per_step": mean_flops / 1e12, "model_tflop_calls_step0": {k: v / 1e12 for k, v in
                                                                               detail["calls"].items()},
         "mfu": mean_flops / mean_time / (args.peak_tflops * 1e12 * ndev),
         "losses_finite": bool(np.all(np.isfinite(losses))), "compiled_memory_bytes": mem,
         "device_peak_bytes_so_far": max(int(st.get("peak_bytes_in_use", 0)) for st in stats),
         "device_bytes_limit": min(int(st.get("bytes_limit", 0)) for st in stats)}
  if name == "sf_dmd":
    out["critic_steps"] = int(recipe.dmd.critic_steps)
  del state, frozen, update, compiled, recipe, teacher, batch
  gc.collect()
  return out


def parse_mesh(items) -> dict:
  """["fsdp=2", ...] -> every mesh axis's size (unnamed axes 1, data -1 if none is named), checked against the
  device count and the batch before anything compiles."""
  from rcm_jax.parallel import mesh as mesh_lib
  spec = {a: 1 for a in mesh_lib.AXES}
  if not items:
    spec["data"] = -1
  for item in items:
    axis, _, n = item.partition("=")
    if axis not in spec or not n.lstrip("-").isdigit():
      raise SystemExit(f"--mesh {item!r}: expected AXIS=N with AXIS one of {list(mesh_lib.AXES)}")
    spec[axis] = int(n)
  return mesh_lib.resolve_shape(spec, jax.device_count())


def tokens_per_frame(geo) -> int:
  return (geo["height"] // 2) * (geo["width"] // 2)


def is_oom(e: Exception) -> bool:
  s = str(e)
  return "RESOURCE_EXHAUSTED" in s or "Out of memory" in s or "out of memory" in s


# ------------------------------------------------------------------------------------------ report
def memory_line(name: str, r: dict) -> str:
  """One --compile_only row: XLA's per-device arguments / outputs (aliased with donated arguments) / temp."""
  m, gib = r["compiled_memory_bytes"], lambda b: f"{b / 2**30:.2f} GiB"
  return (f"| {name} | {r['frames']} x {r['tokens_per_frame']} | {gib(r['params_bytes'])} | "
          f"{gib(r['state_bytes'])} + {gib(r['frozen_bytes'])} | {gib(m.get('argument_size_in_bytes', 0))} | "
          f"{gib(m.get('output_size_in_bytes', 0))} ({gib(m.get('alias_size_in_bytes', 0))} aliased) | "
          f"**{gib(m.get('temp_size_in_bytes', 0))}** | {r['compile_s']} s |")


def markdown(result: dict) -> str:
  rows = result["rows"]
  if result.get("compile_only"):
    return "\n".join([f"# Train-step memory, compile only ({result['devices']} x {result['device']}, jax "
                      f"{result['jax']}, {result['date']})", "", f"Model {result['model']}, remat `{result['remat']}`, "
                      f"attention `{result['attention']}`; command: `{result['command']}`", "",
                      "| recipe | frames x tokens | params | state + frozen | arguments | outputs | temp | compile |",
                      "|---|---|---|---|---|---|---|---|"] +
                     [memory_line(n, r) if "error" not in r else f"| {n} | failed: {r['error'][:120]} |||||||"
                      for n, r in rows.items()]) + "\n"
  lines = [f"# Train-step benchmark ({result['devices']} x {result['device']}, mesh {result['mesh']}, jax "
           f"{result['jax']}, {result['date']})", "",
           f"Model {result['model']}, remat `{result['remat']}`, layers scanned, {result['dtype']} compute, fp32 "
           f"master params + AdamW + EMA, attention `{result['attention']}`, pattern c{result['chunk'][0]}-"
           f"{result['chunk'][1]}, batch {result['batch']}, {result['text_tokens']} text tokens. MFU = analytic "
           f"model FLOPs (no remat recompute) / step time / {result['peak_tflops']} TFLOP/s per device. Memory per "
           f"device (the largest over the devices). XLA_FLAGS: `{result.get('xla_flags', '')}`.", "",
           "| recipe | frames | video tokens/step | step (median) | tokens/s | tokens/s/device | model TFLOP/step | MFU | "
           "compiled temp | device peak so far | compile |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, r in rows.items():
    if "error" in r:
      lines.append(f"| {name} | {r.get('frames', '')} | | failed: {r['error'][:120]} | | | | | | | |")
      continue
    gib = lambda b: f"{b / 2**30:.1f} GiB"
    lines.append(f"| {name} | {r['frames']}{' (reduced)' if r.get('reduced_from') else ''} | {r['video_tokens']} | "
                 f"{r['median_step_s'] * 1e3:.0f} ms | {r['tokens_per_s']:.0f} | {r['tokens_per_s_per_device']:.0f} | "
                 f"{r['model_tflop_per_step']:.3g} | "
                 f"{100 * r['mfu']:.1f}% | {gib(r['compiled_memory_bytes'].get('temp_size_in_bytes', 0))} | "
                 f"{gib(r['device_peak_bytes_so_far'])} | {r['compile_s']} s |")
  lines += ["", "Targets:"]
  for t in result["targets"]:
    lines.append(f"- {t['what']}: {t['value']} (target {t['target']}) -> {t['status']}")
  for name, r in rows.items():
    if r.get("reduced_from"):
      lines.append(f"- {name}: {r['reduced_from']} frames ran out of memory; measured at {r['frames']} frames.")
  return "\n".join(lines) + "\n"


def targets(rows: dict) -> list:
  out = []
  tf = rows.get("tf", {})
  if "mfu" in tf:
    out.append({"what": "TF diffusion MFU", "value": f"{100 * tf['mfu']:.1f}%", "target": ">= 40%",
                "status": "met" if tf["mfu"] >= TARGETS["tf_mfu"] else "NOT met"})
  scm, dcm = rows.get("tf_scm", {}), rows.get("tf_dcm", {})
  if "median_step_s" in scm and "median_step_s" in dcm:
    same = scm["frames"] == dcm["frames"]
    ratio = scm["median_step_s"] / dcm["median_step_s"]
    out.append({"what": "TF-sCM step / TF-dCM step", "value": f"{ratio:.2f}x", "target": "<= 1.3x",
                "status": ("met" if ratio <= TARGETS["scm_over_dcm"] else "NOT met") +
                ("" if same else " (different frame counts)")})
  return out


def write(args, geo, dev, rows) -> str:
  mesh = " x ".join(f"{a}={n}" for a, n in args.mesh.items())
  result = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
            "devices": jax.device_count(), "mesh": mesh,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": geo["size"],
            "dtype": geo["model"]["dtype"], "attention": geo["model"]["attention_impl"], "remat": args.remat,
            "chunk": list(args.chunk), "batch": args.batch, "text_tokens": geo["text_tokens"],
            "peak_tflops": args.peak_tflops, "command": " ".join(sys.argv), "rows": rows,
            "compile_only": args.compile_only, "xla_flags": os.environ.get("XLA_FLAGS", "")}
  result["targets"] = targets(rows)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "train_step.json"), "w") as f:
    json.dump(result, f, indent=2)
  md = markdown(result)
  with open(os.path.join(args.out, "train_step.md"), "w") as f:
    f.write(md)
  return md


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=".")
  ap.add_argument("--tiny", action="store_true", help="CPU-sized model and video: the same code paths in seconds")
  ap.add_argument("--profile", action="store_true", help="after the timed steps, one more step of each recipe under "
                  "jax.profiler, summed up by kernel in <out>/profile_<recipe>.md")
  ap.add_argument("--recipes", default=",".join(RECIPES))
  ap.add_argument("--frames", type=int, default=None, help="latent frames (default 21; --tiny: 4)")
  ap.add_argument("--min_frames", type=int, default=3, help="smallest frame count tried after an out-of-memory")
  ap.add_argument("--chunk", default=None, help="causal pattern first,chunk frames (default 3,3; --tiny: 2,2)")
  ap.add_argument("--remat", default=None, help="none | full | dots_saveable | attention_only | attention_out_only "
                                                "(default full; --tiny: none)")
  ap.add_argument("--batch", type=int, default=1, help="videos per step, split over the mesh's data x fsdp axes")
  ap.add_argument("--mesh", nargs="*", default=[], metavar="AXIS=N",
                  help="mesh axis sizes (data, fsdp, context, tensor; the others 1), e.g. fsdp=2 or context=2; "
                       "their product must be the device count (default: data = all devices)")
  ap.add_argument("--iters", type=int, default=None, help="timed steps per recipe (default 5; --tiny: 2)")
  ap.add_argument("--critic_steps", type=int, default=None,
                  help="SF-DMD critic updates per student update (default: the paper's 5; --tiny: 1)")
  ap.add_argument("--no_replay", action="store_true",
                  help="SF-DMD without replayed backprop (one KV-cache copy per chunk kept for the backward pass; "
                       "does not fit at 21 frames on one H100)")
  ap.add_argument("--attention", default=None, help="attention_impl override (pallas | cudnn | xla; default pallas, "
                                                   "--tiny: xla; pallas on CPU runs in interpret mode)")
  ap.add_argument("--mu_dtype", default="float32", choices=MU_DTYPES,
                  help="Adam's first moment of the student and critic (optim.mu_dtype): bfloat16 halves its memory")
  ap.add_argument("--compile_only", action="store_true",
                  help="compile each update from shapes alone and report XLA's memory analysis (no weights are "
                       "allocated, nothing runs): a CPU can check what a GPU would need")
  ap.add_argument("--layers", type=int, default=None, help="Wan blocks (default 30)")
  ap.add_argument("--latent_hw", default=None, help="latent height,width (default 60,104: 480p); small values "
                                                    "with --compile_only isolate the memory that scales with "
                                                    "the weights")
  ap.add_argument("--peak_tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                  help="the peak MFU divides by (H100 SXM bf16 dense: 989)")
  ap.add_argument("--gemm_epilogues", action="store_true",
                  help="add rcm_jax.xla_flags.GEMM_EPILOGUES to XLA_FLAGS (cuBLASLt bias/GELU epilogues; what "
                       "`sample` and `play` run with; training keeps XLA's defaults unless this shows a gain)")
  args = ap.parse_args()
  if args.gemm_epilogues:   # before the first device use: XLA reads XLA_FLAGS once
    from rcm_jax import xla_flags
    xla_flags.add(xla_flags.GEMM_EPILOGUES)
  args.frames = args.frames or (4 if args.tiny else 21)
  args.chunk = tuple(int(v) for v in (args.chunk or ("2,2" if args.tiny else "3,3")).split(","))
  args.critic_steps = args.critic_steps or (1 if args.tiny else 5)
  args.remat = args.remat or ("none" if args.tiny else "full")
  args.iters = args.iters or (2 if args.tiny else 5)
  args.mesh = parse_mesh(args.mesh)
  args.latent_hw = tuple(int(v) for v in args.latent_hw.split(",")) if args.latent_hw else None
  if args.latent_hw and (len(args.latent_hw) != 2 or min(args.latent_hw) < 2 or any(v % 2 for v in args.latent_hw)):
    raise SystemExit(f"--latent_hw {args.latent_hw}: two even sizes >= 2 (the 2x2 patch), e.g. 60,104")
  from rcm_jax.parallel import mesh as mesh_lib
  try:
    mesh_lib.check_batch(args.batch, args.mesh)
  except mesh_lib.MeshError as e:
    raise SystemExit(f"train_step: {e} (the flag is --batch)") from None
  geo = shapes(args)
  if args.attention:
    geo["model"]["attention_impl"] = args.attention
  dev = jax.devices()[0]
  print(f"device {dev.device_kind} ({dev.platform}) | jax {jax.__version__} | {geo['size']} | {args.frames} frames "
        f"x {tokens_per_frame(geo)} tokens | remat {args.remat} | chunk {args.chunk} | {jax.device_count()} devices, "
        f"mesh {args.mesh}", flush=True)
  rows = {}
  for name in args.recipes.split(","):
    frames = args.frames
    while True:
      try:
        r = run_recipe(args, geo, name, frames)
        if frames != args.frames:
          r["reduced_from"] = args.frames
        rows[name] = r
        if args.compile_only:
          print(memory_line(name, r), flush=True)
          break
        print(f"{name:7s} {frames} frames | step {r['median_step_s'] * 1e3:9.1f} ms | {r['tokens_per_s']:9.0f} "
              f"tokens/s | {r['model_tflop_per_step']:8.3g} TFLOP | MFU {100 * r['mfu']:5.1f}% | compiled temp "
              f"{r['compiled_memory_bytes'].get('temp_size_in_bytes', 0) / 2**30:.2f} GiB | compile "
              f"{r['compile_s']} s", flush=True)
        break
      except Exception as e:  # noqa: BLE001 -- an OOM retries smaller; anything else is reported, not hidden
        gc.collect()
        step = args.chunk[1]
        smaller = frames - step
        if is_oom(e) and smaller >= max(args.min_frames, args.chunk[0]):
          print(f"{name}: out of memory at {frames} frames; retrying at {smaller}", flush=True)
          frames = smaller
          continue
        tb = traceback.format_exc()
        rows[name] = {"frames": frames, "error": f"{type(e).__name__}: {str(e)[:2000]}", "traceback": tb[-6000:]}
        print(f"{name}: FAILED at {frames} frames:\n{tb[-6000:]}", flush=True)
        break
    write(args, geo, dev, rows)   # after every recipe: a run cut short keeps what it measured
  md = write(args, geo, dev, rows)
  print(md, flush=True)
  failed = [n for n, r in rows.items() if "error" in r]
  if failed:
    raise SystemExit(f"train_step: recipes failed: {failed}")


if __name__ == "__main__":
  main()
