"""Streaming generation speed of a Wan2.1-1.3B-shaped causal DiT (random weights) through `rollout.stream`.

  python benchmarks/streaming.py --out $OUT                       # GPU: the full grid, attention impl pallas
  python benchmarks/streaming.py --out $OUT --impl cudnn,xla      # other attention implementations
  python benchmarks/streaming.py --out /tmp/stream_tiny --tiny    # the same code on CPU in seconds
  python benchmarks/streaming.py --out $OUT --decode              # + end to end: the Wan VAE decodes each chunk
  python benchmarks/streaming.py --out $OUT --profile             # + a jax.profiler trace of the first chunks and
                                                                  #   where their device time goes (profile.md)
  python benchmarks/streaming.py --out $OUT --no-gemm_epilogues   # XLA's default GEMMs (the flags' A/B)

What it times (DiT only: no VAE decoding, no text encoder; the text embeddings are random [1, 512, 4096]):
81 RGB frames = 21 latent frames of 60 x 104 x 16 (1560 tokens a frame after the 2x2 patch), bf16 compute,
bf16 params, jitted (one executable per distinct chunk geometry, compiled in a warm-up stream first). For each
attention impl x pattern (frame-wise c1-1: 21 chunks of 1 frame; chunk-wise c3-3: 7 chunks of 3 frames) x
steps (1, 2, 4; the paper's consistency schedule: the first chunk always takes 4 steps) x context (clean: an
extra t=0 pass writes the cache; noisy: the exit step's K/V): first-chunk latency, mean next-chunk latency,
the whole video's wall time, FPS (81 RGB frames / wall time), and the FLOP count of the same calls with its
limit at --peak_tflops (798: the bf16 matmul rate measured on the project's H100), printed as a fraction.

FLOPs (counted for the calls actually made): per call on a chunk of Lq tokens that sees Lk keys (visible cache +
itself), per layer: q/k/v/o projections 8 Lq D^2, cross-attention q/o 4 Lq D^2, self-attention 4 Lq Lk D,
cross-attention 4 Lq Lc D, MLP 4 Lq D F; once per stream (the stream reuses them in every call), the text
embedder 2 Lc (T D + D^2) and every layer's k/v of the text 4 Lc D^2.
At Wan2.1-1.3B shape this gives (c3-3): 2-step noisy 429 TFLOP (limit 151 FPS at 798 TFLOP/s; 396 TFLOP and 163
FPS with 2 steps on the first chunk too), 4-step clean 950 TFLOP (68 FPS). The issue's 990 TFLOP for 4 steps
count a cache pass after the last chunk (never read, so never run here).
cudnn: `rcm_jax.models.attention` takes no mask with impl="cudnn", and a KV-cache chunk always passes one (the
chunk-vs-cache visibility), so cudnn rows record the error until that entry point forwards the mask.
Compiles: one executable per distinct chunk geometry; without a window the cache view grows every chunk, so a
row compiles 21 (frame-wise) or 7 (chunk-wise) functions in its warm-up stream (scan_layers keeps each compile
short; --compile_cache reuses them across runs on the CPU; on an H100 under jax 0.11.2 a second run took as
long: RESULTS.md, twelfth streaming run; with --compile_cache each row now records the chunk functions' cache
hits and misses, and every key, from jax's log). Split the grid over calls (--patterns/--steps/--contexts) to stay
within a time limit.
Writes <out>/streaming.json (every row, the device, the command) and <out>/streaming.md (table lines).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rcm_jax import xla_flags  # noqa: E402
from rcm_jax.inference import rollout  # noqa: E402
from rcm_jax.models.config import get_config  # noqa: E402
from rcm_jax.models.wan import WanModel, init_params  # noqa: E402
from rcm_jax.recipes.causal import BlockPattern  # noqa: E402

RGB_FRAMES_PER_LATENT = 81 / 21   # Wan's VAE: 1 + 4 (T - 1) RGB frames for T latent frames


def shapes(tiny: bool) -> dict:
  if tiny:
    return dict(size="tiny", overrides=dict(dim=64, num_heads=2, num_layers=2, ffn_dim=128, in_channels=4,
                                            out_channels=4, text_dim=32, freq_dim=32),
                frames=4, latent_hw=(8, 8), text_tokens=8, patterns={"framewise": (1, 1), "chunkwise": (2, 2)})
  return dict(size="wan_1p3b", overrides={}, frames=21, latent_hw=(60, 104), text_tokens=512,
              patterns={"framewise": (1, 1), "chunkwise": (3, 3)})


def call_flops(cfg, lq: int, lk: int, lc: int) -> float:
  d, f, layers = cfg.dim, cfg.ffn_dim, cfg.num_layers
  return layers * (8 * lq * d * d + 4 * lq * d * d + 4 * lq * lk * d + 4 * lq * lc * d + 4 * lq * d * f)


def cross_kv_flops(cfg, lc: int) -> float:
  """The text embedder and every layer's cross-attention k/v of the text: once per stream."""
  d = cfg.dim
  return 2 * lc * (cfg.text_dim * d + d * d) + cfg.num_layers * 4 * lc * d * d


def video_flops(cfg, plan, schedules, tpf: int, lc: int, noisy_context: bool) -> float:
  """FLOPs of every network call of one stream (visible keys only)."""
  total = cross_kv_flops(cfg, lc)
  for i, (f0, f1) in enumerate(plan.blocks):
    lq = (f1 - f0) * tpf
    mask = plan.mask(i, tpf)                    # every query row sees the same keys: visible cache + the chunk
    visible = round(mask.density() * mask.shape[1])
    calls = len(schedules[i]) - 1 + (0 if noisy_context or plan.writes[i] is None else 1)
    total += calls * call_flops(cfg, lq, visible, lc)
  return total


class CacheLog(logging.Handler):
  """jax's persistent compilation cache hits and misses (`jax._src.compiler` logs each at DEBUG level, with the
  module's name and cache key). With --compile_cache each row records them for its warm-up, keys included, so
  that two runs can be compared key by key."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.events = []

  def install(self):
    logger = logging.getLogger("jax._src.compiler")
    self._level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(self)
    return self

  def uninstall(self):
    logger = logging.getLogger("jax._src.compiler")
    logger.removeHandler(self)
    logger.setLevel(self._level)

  def emit(self, record):
    msg = str(record.msg)
    kind = "hit" if msg.startswith("Persistent compilation cache hit") else (
        "miss" if msg.startswith("PERSISTENT COMPILATION CACHE MISS") else None)
    if kind:
      self.events.append((kind, *map(str, record.args)))

  def take(self) -> dict:
    """The events since the last call, as a row's fields: counts for the stream's chunk functions (small jits that
    compile in under jax_persistent_cache_min_compile_time_secs are never written, so they always miss), and every
    event."""
    events, self.events = self.events, []
    chunks = [e for e in events if e[1] == "jit__stream_chunk_impl"]
    return dict(persistent_cache_chunk_hits=sum(e[0] == "hit" for e in chunks),
                persistent_cache_chunk_misses=sum(e[0] == "miss" for e in chunks),
                persistent_cache_events=[" ".join(e) for e in events])


def run_row(model, params, cfg, sh, impl, pattern_name, steps, context, repeats, profile_dir=None,
            kv_dtype="bfloat16", first_chunk_steps=4, vae=None, in_place=True, cache_log=None, runtime_masks=False):
  first, chunk = sh["patterns"][pattern_name]
  plan = rollout.make_plan(BlockPattern(first, chunk), sh["frames"])
  schedules = rollout.schedules_for(plan, "consistency", steps, first_chunk_steps=first_chunk_steps)
  h, w = sh["latent_hw"]
  tpf = (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
  key = jax.random.key(0)
  noise = jax.random.normal(key, (1, sh["frames"], h, w, cfg.in_channels), jnp.float32)
  cond = {"context": jax.random.normal(jax.random.fold_in(key, 1), (1, sh["text_tokens"], cfg.text_dim),
                                       jnp.bfloat16)}
  kw = dict(plan=plan, schedules=schedules, noisy_context=context == "noisy", rng=key, kv_cache_dtype=kv_dtype,
            in_place=in_place, runtime_masks=runtime_masks)

  def one():
    t0 = time.perf_counter()
    chunks = list(rollout.stream(model, params, noise, cond, **kw))
    return chunks, time.perf_counter() - t0

  t0 = time.perf_counter()
  warm = []                            # compiles every distinct chunk geometry
  for ch in rollout.stream(model, params, noise, cond, **kw):
    warm.append(ch)
    print(f"#   warm-up chunk {ch.index + 1}/{len(plan.blocks)}: {ch.seconds:.1f} s"
          f"{' (compiled)' if ch.compiled else ''}", flush=True)
  compile_s = time.perf_counter() - t0
  cached = cache_log.take() if cache_log else {}
  if cached:
    print(f"#   persistent compilation cache, chunk functions: {cached['persistent_cache_chunk_hits']} hits, "
          f"{cached['persistent_cache_chunk_misses']} misses", flush=True)
  runs = [one() for _ in range(repeats)]
  chunks, wall = min(runs, key=lambda r: r[1])
  decoded = stream_with_decode(model, params, noise, cond, kw, vae, repeats) if vae is not None else {}
  if profile_dir:
    os.makedirs(profile_dir, exist_ok=True)
    steady = min(2, len(plan.blocks) - 1)
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      for ch in rollout.stream(model, params, noise, cond, **kw):
        if ch.index == steady:
          break
    import profile_summary   # benchmarks/ is on sys.path (this script's directory)
    text = profile_summary.to_markdown(profile_summary.summarize(profile_summary.load_trace(profile_dir)))
    print(f"# profile of chunks 1..{steady + 1} ({profile_dir}):\n{text}", flush=True)
    with open(os.path.join(os.path.dirname(profile_dir), "profile.md"), "w") as f:
      f.write(text)
  flops = video_flops(cfg, plan, schedules, tpf, sh["text_tokens"], context == "noisy")
  return dict(impl=impl, pattern=pattern_name, chunks=len(plan.blocks), chunk_frames=chunk, steps=steps,
              first_chunk_steps=first_chunk_steps,
              context=context, first_chunk_ms=1000 * chunks[0].seconds,
              next_chunk_ms=1000 * float(np.mean([c.seconds for c in chunks[1:]])) if len(chunks) > 1 else None,
              video_s=wall, latent_fps=sh["frames"] / wall, rgb_fps=sh["frames"] * RGB_FRAMES_PER_LATENT / wall,
              tflop=flops / 1e12, compile_and_first_run_s=compile_s, **decoded,
              compiles=sum(c.compiled for c in warm), recompiles_after_warmup=sum(c.compiled for c in chunks), **cached)


def stream_with_decode(model, params, noise, cond, kw, vae, repeats) -> dict:
  """The same stream with each chunk's latents decoded to RGB frames by the Wan VAE (`wan_vae.decode_chunk`,
  its causal cache carried from chunk to chunk) as soon as the chunk is ready, on the same device, one after the
  other: first-chunk latency and FPS end to end. vae = (params, the jitted `decode_chunk`, built once for every
  row); the first pass compiles its shapes (first chunk, later chunks) where an earlier row has not."""
  vparams, decode = vae

  def one():
    t0, cache, first, frames, decode_s = time.perf_counter(), None, None, 0, 0.0
    for ch in rollout.stream(model, params, noise, cond, **kw):
      t1 = time.perf_counter()
      rgb, cache = decode(vparams, ch.video, cache)
      rgb.block_until_ready()
      decode_s += time.perf_counter() - t1
      frames += rgb.shape[1]
      first = time.perf_counter() - t0 if first is None else first
    return time.perf_counter() - t0, first, frames, decode_s

  one()
  wall, first, frames, decode_s = min((one() for _ in range(repeats)), key=lambda r: r[0])
  return dict(decode_first_chunk_ms=1000 * first, decode_video_s=wall, decode_rgb_frames=frames,
              decode_vae_s=decode_s, decode_rgb_fps=frames / wall)


def grid(args) -> list:
  """The (steps, context, first_chunk_steps) rows: --rows as given (STEPS:CONTEXT[:FIRST]), else every --steps x
  --contexts pair; FIRST defaults to --first_chunk_steps."""
  first = int(args.first_chunk_steps)
  if args.rows:
    rows = [r.split(":") for r in args.rows.split(",")]
    if any(len(r) not in (2, 3) or not r[0].isdigit() or r[1] not in ("clean", "noisy") or
           (len(r) == 3 and not r[2].isdigit()) for r in rows):
      raise SystemExit(f"--rows {args.rows!r}: expected STEPS:CONTEXT[:FIRST_CHUNK_STEPS] items, e.g. "
                       "2:noisy,4:clean,2:noisy:2")
    return [(int(r[0]), r[1], int(r[2]) if len(r) == 3 else first) for r in rows]
  return [(int(n), c, first) for n in args.steps.split(",") for c in args.contexts.split(",")]


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--tiny", action="store_true", help="tiny shapes on any backend (CPU: seconds)")
  ap.add_argument("--impl", default=None, help="comma list of cudnn,pallas,xla (default: pallas on GPU, xla tiny)")
  ap.add_argument("--patterns", default="chunkwise,framewise", help="chunkwise first: 7 compiles a row, not 21")
  ap.add_argument("--steps", default="1,2,4")
  ap.add_argument("--contexts", default="clean,noisy")
  ap.add_argument("--rows", default="", help="explicit STEPS:CONTEXT[:FIRST_CHUNK_STEPS] rows instead of the --steps x "
                                             "--contexts grid, e.g. 2:noisy,4:clean (the issue's two targets),"
                                             "2:noisy:2")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--decode", action="store_true",
                  help="also time each row with the Wan VAE decoding every chunk as it comes (random weights)")
  ap.add_argument("--first_chunk_steps", type=int, default=4,
                  help="steps of the first chunk (the paper's 4; 2 or 1 cut the first-chunk latency)")
  ap.add_argument("--kv_cache_dtype", default="bfloat16", choices=rollout.KV_CACHE_DTYPES)
  ap.add_argument("--peak_tflops", type=float, default=798.0, help="bf16 matmul rate of the card (H100: 798)")
  ap.add_argument("--profile", action="store_true",
                  help="jax.profiler trace of the first row's first 3 chunks, summed up in profile.md")
  ap.add_argument("--concat_kv", action="store_true",
                  help="attend over a [cache | chunk] concatenation (the training rollouts' layout) instead of the "
                       "chunk's k/v inside the cache buffer (rollout.stream(in_place=False)): the A/B of that copy")
  ap.add_argument("--runtime_masks", action="store_true",
                  help="each chunk's mask as run-time key intervals (rollout.stream(runtime_masks=True)): one compile "
                       "per chunk role instead of per chunk")
  ap.add_argument("--unrolled", action="store_true", help="per-layer blocks instead of scan_layers (slower compiles)")
  ap.add_argument("--compile_cache", default="",
                  help="a jax persistent compilation cache dir (CPU re-runs skip compiles; on an H100 a"
                       " re-run took as long: RESULTS.md)")
  ap.add_argument("--gemm_epilogues", action=argparse.BooleanOptionalAction, default=True,
                  help="add rcm_jax.xla_flags.GEMM_EPILOGUES to XLA_FLAGS, as `sample` and `play` do "
                       "(--no-gemm_epilogues: XLA's defaults)")
  args = ap.parse_args()
  if args.gemm_epilogues:   # before the first device use: XLA reads XLA_FLAGS once
    xla_flags.add(xla_flags.GEMM_EPILOGUES)
  sh = shapes(args.tiny)
  cache_log = None
  if args.compile_cache:
    jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    cache_log = CacheLog().install()
  impls = (args.impl or ("xla" if args.tiny or jax.default_backend() == "cpu" else "pallas")).split(",")
  os.makedirs(args.out, exist_ok=True)
  device = jax.devices()[0]
  meta = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__,
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              command=" ".join(sys.argv), tiny=args.tiny, scan_layers=not args.unrolled, frames=sh["frames"],
              latent_hw=sh["latent_hw"],
              text_tokens=sh["text_tokens"], peak_tflops=args.peak_tflops, kv_cache_dtype=args.kv_cache_dtype,
              kv_layout="concatenated" if args.concat_kv else "in place", runtime_masks=args.runtime_masks,
              xla_flags=os.environ.get("XLA_FLAGS", ""),
              timed="DiT only (no VAE decoding)" + ("; the lines after the table add the Wan VAE (random weights, "
                                                    "bf16) decoding each chunk" if args.decode else ""))
  rows, lines = [], []
  header = ("| impl | pattern | steps | first chunk steps | context | first chunk ms | next chunk ms | video s | "
            "RGB FPS | TFLOP | FPS limit | fraction |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
  print(f"# {meta['device']}, jax {meta['jax']}, {meta['date']}, {meta['timed']}, KV cache {meta['kv_layout']}, "
        f"XLA_FLAGS={meta['xla_flags']!r}\n"
        f"{header}", flush=True)
  vae = None
  if args.decode:
    from rcm_jax.interop import wan_vae
    vcfg = dataclasses.replace(wan_vae.TINY if args.tiny else wan_vae.WAN2P1, dtype="bfloat16")
    vae = (wan_vae.init_params(0, vcfg), jax.jit(functools.partial(wan_vae.decode_chunk, config=vcfg)))
  for impl in impls:
    cfg = get_config(sh["size"], **sh["overrides"], dtype="bfloat16", attention_impl=impl,
                     scan_layers=not args.unrolled)
    model = WanModel(cfg)
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
    params = {"params": jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)}
    for pattern in args.patterns.split(","):
      for steps, context, first_steps in grid(args):
        prof = os.path.join(args.out, "trace") if args.profile and not rows else None
        print(f"# {impl} {pattern} {steps}-step {context} (first chunk {first_steps}): warm-up (compiles each "
              "chunk geometry) ...", flush=True)
        try:
          r = run_row(model, params, cfg, sh, impl, pattern, steps, context, args.repeats, prof,
                      args.kv_cache_dtype, first_steps, vae, not args.concat_kv, cache_log, args.runtime_masks)
        except Exception as e:   # e.g. an impl that cannot take this mask: recorded, the grid goes on
          r = dict(impl=impl, pattern=pattern, steps=steps, first_chunk_steps=first_steps, context=context,
                   error=f"{type(e).__name__}: {e}"[:300])
          print(f"| {impl} | {pattern} | {steps} | {first_steps} | {context} | failed: {r['error'][:120]} |",
                flush=True)
          rows.append(r)
          continue
        limit_s = r["tflop"] / args.peak_tflops
        r["fps_limit"] = sh["frames"] * RGB_FRAMES_PER_LATENT / limit_s
        r["fraction_of_limit"] = r["rgb_fps"] / r["fps_limit"]
        nxt = "-" if r["next_chunk_ms"] is None else f"{r['next_chunk_ms']:.1f}"
        line = (f"| {impl} | {pattern} | {steps} | {first_steps} | {context} | {r['first_chunk_ms']:.1f} | {nxt} | "
                f"{r['video_s']:.3f} | {r['rgb_fps']:.1f} | {r['tflop']:.3g} | {r['fps_limit']:.3g} | "
                f"{r['fraction_of_limit']:.3g} |")
        print(line, flush=True)
        rows.append(r)
        lines.append(line)
        if vae is not None:
          dec = (f"with Wan VAE decoding each chunk ({impl} {pattern} {steps}-step {context}, first chunk "
                 f"{first_steps}): first chunk {r['decode_first_chunk_ms']:.1f} ms, {r['decode_rgb_frames']} RGB "
                 f"frames in {r['decode_video_s']:.3f} s = {r['decode_rgb_fps']:.1f} FPS end to end (VAE "
                 f"{r['decode_vae_s']:.3f} s of it)")
          print(f"# {dec}", flush=True)
          lines.append(f"\n{dec}\n")
        _write(args.out, meta, rows, header, lines)   # after every row: a time limit still leaves the rows done
  _write(args.out, meta, rows, header, lines)
  print(f"wrote {args.out}/streaming.json and streaming.md")


def _write(out, meta, rows, header, lines):
  with open(os.path.join(out, "streaming.json"), "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  with open(os.path.join(out, "streaming.md"), "w") as f:
    f.write(f"{meta['device']}, jax {meta['jax']}, {meta['date']}, {meta['timed']}, KV cache {meta['kv_layout']}, "
            f"XLA_FLAGS `{meta['xla_flags']}`; `{meta['command']}`\n\n")
    f.write(header + "\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
