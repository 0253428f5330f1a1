"""Where the device time goes, from a `jax.profiler.trace(..., create_perfetto_trace=True)` directory.

  python benchmarks/profile_summary.py TRACE_DIR [--top 25]      # prints the table; --md FILE also writes it
  python benchmarks/profile_summary.py TRACE_DIR --calls mosaic --first 12   # each call of the matching
                                                   # kernels in time order: the calls that share one name apart

Reads the newest perfetto_trace.json.gz under TRACE_DIR and keeps the complete events ("ph": "X") of the
device processes (process names with "/device:"; the host's Python and runtime events are left out). Per kernel
name: calls, total and mean time, share of the busy time; per class (attention: flash / Mosaic / Pallas /
cuDNN fused attention; matmul: cuBLAS / CUTLASS / nvjet GEMMs; copy: memcpy / memset; other: XLA's fusions and
the rest); and the span from the first device event to the last, the busy time (union of the kernels'
intervals over all streams) and the idle rest: the gaps in which the device waited on the host.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re

CLASSES = (("attention", re.compile(r"flash|mosaic|pallas|fmha|attention|cudnn", re.I)),
           ("matmul", re.compile(r"gemm|cutlass|nvjet|xmma|cublas|sm\d+_", re.I)),
           ("copy", re.compile(r"memcpy|memset|copy", re.I)))


def kernel_class(name: str) -> str:
  for label, pattern in CLASSES:
    if pattern.search(name):
      return label
  return "other"


def load_trace(trace_dir: str) -> list:
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise SystemExit(f"no perfetto_trace.json.gz under {trace_dir}: trace with "
                     "jax.profiler.trace(dir, create_perfetto_trace=True)")
  with gzip.open(files[-1], "rt") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def _union_us(intervals) -> float:
  busy, end = 0.0, float("-inf")
  for s, e in sorted(intervals):
    if e > end:
      busy += e - max(s, end)
      end = e
  return busy


def device_kernels(events: list) -> list:
  """The complete events ("ph": "X") of the device processes: the kernels and copies the device ran."""
  devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
             and "/device:" in str(e.get("args", {}).get("name", ""))}
  return [e for e in events if e.get("ph") == "X" and e.get("pid") in devices and "dur" in e]


def summarize(events: list) -> dict:
  """{span_ms, busy_ms, idle_ms, kernels: [(name, class, calls, total_ms)], classes: {class: total_ms}}."""
  kernels = device_kernels(events)
  if not kernels:
    return dict(span_ms=0.0, busy_ms=0.0, idle_ms=0.0, kernels=[], classes={})
  start = min(float(e["ts"]) for e in kernels)
  end = max(float(e["ts"]) + float(e["dur"]) for e in kernels)
  busy = _union_us((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in kernels)
  per = {}
  for e in kernels:
    calls, total = per.get(e["name"], (0, 0.0))
    per[e["name"]] = (calls + 1, total + float(e["dur"]))
  rows = sorted(((n, kernel_class(n), c, t / 1e3) for n, (c, t) in per.items()), key=lambda r: -r[3])
  classes = {}
  for _, cls, _, t in rows:
    classes[cls] = classes.get(cls, 0.0) + t
  return dict(span_ms=(end - start) / 1e3, busy_ms=busy / 1e3, idle_ms=(end - start - busy) / 1e3, kernels=rows,
              classes=dict(sorted(classes.items(), key=lambda kv: -kv[1])))


def calls(events: list, pattern: str, first: int = 20) -> str:
  """The first `first` device calls whose kernel name matches `pattern` (a regex), in start order: start
  (ms from the first of them), duration and the event's HLO op where the trace names it."""
  rx = re.compile(pattern)
  hits = sorted((e for e in device_kernels(events) if rx.search(e["name"])), key=lambda e: float(e["ts"]))[:first]
  if not hits:
    return f"no device call matches {pattern!r}\n"
  t0 = float(hits[0]["ts"])
  out = ["| # | start ms | us | kernel | op |", "|---|---|---|---|---|"]
  for i, e in enumerate(hits):
    a = e.get("args", {})
    op = a.get("hlo_op") or a.get("long_name") or a.get("name") or ""
    out.append(f"| {i} | {(float(e['ts']) - t0) / 1e3:.3f} | {float(e['dur']):.1f} | `{e['name'][:50]}` | "
               f"`{str(op)[:60]}` |")
  return "\n".join(out) + "\n"


def to_markdown(s: dict, top: int = 25) -> str:
  if not s["kernels"]:
    return "no device events in the trace (a CPU run records host events only)\n"
  total = sum(t for *_, t in s["kernels"])
  out = [f"device span {s['span_ms']:.2f} ms, busy {s['busy_ms']:.2f} ms "
         f"({100 * s['busy_ms'] / max(s['span_ms'], 1e-9):.1f}%), idle {s['idle_ms']:.2f} ms; "
         f"kernel time summed over streams {total:.2f} ms", "",
         "| class | ms | share |", "|---|---|---|"]
  out += [f"| {c} | {t:.2f} | {100 * t / total:.1f}% |" for c, t in s["classes"].items()]
  out += ["", f"| kernel (top {top}) | class | calls | total ms | mean us | share |", "|---|---|---|---|---|---|"]
  for name, cls, calls, t in s["kernels"][:top]:
    out.append(f"| `{name[:90]}` | {cls} | {calls} | {t:.2f} | {1e3 * t / calls:.1f} | {100 * t / total:.1f}% |")
  return "\n".join(out) + "\n"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("trace_dir")
  ap.add_argument("--top", type=int, default=25)
  ap.add_argument("--md", default="", help="also write the table to this file")
  ap.add_argument("--calls", default="", help="instead: list each call of the kernels matching this regex")
  ap.add_argument("--first", type=int, default=20, help="--calls: how many")
  args = ap.parse_args()
  events = load_trace(args.trace_dir)
  text = calls(events, args.calls, args.first) if args.calls else to_markdown(summarize(events), args.top)
  print(text)
  if args.md:
    with open(args.md, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
