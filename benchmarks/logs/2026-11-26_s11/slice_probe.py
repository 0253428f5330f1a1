"""Which XLA flags let a scanned layer's GEMMs read their stacked weights in place (no weight-slice copy)?

One-off probe (session 7). For each flag set (a subprocess each, XLA_FLAGS is per process) it compiles
  A: lax.scan over 4 layers of a Wan FFN (x @ W1[i] + b1[i], gelu, @ W2[i] + b2[i]) with bf16 stacked weights;
  B: the Wan2.1-1.3B-shaped WanModel with 4 scanned layers, one 3-frame chunk (4680 tokens), bf16 params;
and counts, in the optimised HLO's while body, the fusions / copies whose root is a dynamic-slice of a stacked
weight, the dynamic-slice (address computation) fusions, and the cuBLAS custom calls; then times 20 calls.
"""
import os, re, subprocess, sys, time

FLAGS = {
    "none": "",
    "dsf": "--xla_gpu_enable_dynamic_slice_fusion=true",
    "lt": "--xla_gpu_enable_cublaslt=true --xla_gpu_enable_triton_gemm=false",
    "dsf_lt": "--xla_gpu_enable_dynamic_slice_fusion=true --xla_gpu_enable_cublaslt=true --xla_gpu_enable_triton_gemm=false",
    "dsf_legacy": "--xla_gpu_enable_dynamic_slice_fusion=true --xla_gpu_enable_triton_gemm=false",
    "legacy": "--xla_gpu_enable_cublaslt=false --xla_gpu_enable_triton_gemm=false",
    "legacy_dsf": "--xla_gpu_enable_cublaslt=false --xla_gpu_enable_triton_gemm=false "
                  "--xla_gpu_enable_dynamic_slice_fusion=true",
}


def child(case):
  sys.path.insert(0, os.getcwd())
  import jax, jax.numpy as jnp
  def report(name, fn, *args):
    comp = jax.jit(fn).lower(*args).compile()
    hlo = comp.as_text()
    calls = re.findall(r'custom_call_target="([^"]+)"', hlo)
    ds_fusions = [l for l in hlo.splitlines() if re.search(r"ROOT .*dynamic-slice\(", l)]
    addr = len(re.findall(r"address_computation|__custom_fusion", hlo))
    copies = len(re.findall(r"= [a-z0-9\[\],{} ]*copy\(", hlo))
    out = comp(*args); jax.block_until_ready(out)
    ts = []
    for _ in range(20):
      t0 = time.perf_counter(); jax.block_until_ready(comp(*args)); ts.append(time.perf_counter() - t0)
    gemms = {c: calls.count(c) for c in sorted(set(calls))}
    print(f"{case:10s} {name}: {sorted(ts)[10]*1e3:8.3f} ms | dynamic-slice roots {len(ds_fusions)} | "
          f"address-computation mentions {addr} | copy ops {copies} | custom calls {gemms}", flush=True)
    for l in ds_fusions[:6]:
      print("    ", l.strip()[:200])
  # A: a scanned FFN stack
  n, L, D, F = 4, 4680, 1536, 8960
  k = jax.random.split(jax.random.key(0), 5)
  w1 = (jax.random.normal(k[0], (n, D, F)) * 0.02).astype(jnp.bfloat16)
  b1 = jnp.zeros((n, F), jnp.bfloat16)
  w2 = (jax.random.normal(k[1], (n, F, D)) * 0.02).astype(jnp.bfloat16)
  b2 = jnp.zeros((n, D), jnp.bfloat16)
  x = jax.random.normal(k[2], (L, D), jnp.bfloat16)
  def ffn_stack(x, w1, b1, w2, b2):
    def body(h, p):
      a, c, d, e = p
      return h + (jax.nn.gelu(h @ a + c) @ d + e), None
    return jax.lax.scan(body, x, (w1, b1, w2, b2))[0]
  report("A scanned FFN", ffn_stack, x, w1, b1, w2, b2)
  # B: the Wan model, 4 scanned layers, one chunk
  from rcm_jax.models.wan import WanModel, init_params
  from rcm_jax.models.config import get_config
  cfg = get_config("wan_1p3b", num_layers=4, scan_layers=True, dtype="bfloat16", attention_impl="pallas")
  model = WanModel(cfg)
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), init_params(cfg, jax.random.key(1)))
  xv = jax.random.normal(k[3], (1, 3, 60, 104, 16), jnp.float32)
  t = jnp.full((1, 3), 0.5)
  ctx = jax.random.normal(k[4], (1, 512, cfg.text_dim), jnp.bfloat16)
  report("B WanModel x4", lambda p, x, t, c: model.apply({"params": p}, x, t, context=c), params, xv, t, ctx)


if __name__ == "__main__":
  if len(sys.argv) > 1:
    child(sys.argv[1]); sys.exit()
  import jax
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  only = os.environ.get("PROBE_CASES")
  for case, flags in FLAGS.items():
    if only and case not in only.split(","):
      continue
    env = dict(os.environ, XLA_FLAGS=flags)
    r = subprocess.run([sys.executable, __file__, case], env=env, capture_output=True, text=True, timeout=150)
    print(r.stdout, end="")
    if r.returncode:
      print(f"{case}: exit {r.returncode}\n{r.stderr[-2000:]}")
