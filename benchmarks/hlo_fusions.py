"""What the profile's kernels are: the optimized HLO of the fusions a profile names, with their JAX source.

A GPU profile (`profile_summary.py`, `train_step.py --profile`, `streaming.py --profile`) names XLA's kernels by
their fusion instruction (`input_add_multiply_reduce_fusion`, `loop_pad_fusion_4`); this script finds those
instructions in an XLA dump (`XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text`) and prints, for each, its
shape, the JAX ops it came from (the `op_name` metadata of its root and its fused instructions) and the first
lines of its fused computation.

  python3 benchmarks/hlo_fusions.py --dump DIR --profile profile_tf.md --classes other,copy --top 25
  python3 benchmarks/hlo_fusions.py --dump DIR --names loop_pad_fusion_4,fusion_383
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?.*\{\s*$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_FRAME = re.compile(r"stack_frame_id=(\d+)")


def parse_frames(text: str, prefer: str):
  """The module's stack-frame tables -> {stack_frame_id: "file:line"}, each frame at its innermost location
  whose file matches `prefer` (our code, rather than flax or jax internals), else its innermost."""
  tables, section = {}, None
  for line in text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      section = tables.setdefault(line, {})
    elif section is not None and line and line[0].isdigit():
      key, rest = line.split(" ", 1)
      section[int(key)] = rest
    elif section is not None and not line.strip():
      section = None
  files = {k: v.strip('"') for k, v in tables.get("FileNames", {}).items()}
  locs = {}
  for k, v in tables.get("FileLocations", {}).items():
    f, ln = re.search(r"file_name_id=(\d+)", v), re.search(r"\bline=(\d+)", v)
    if f and ln:
      locs[k] = f"{files.get(int(f.group(1)), '?')}:{ln.group(1)}"
  frames = {}
  for k, v in tables.get("StackFrames", {}).items():
    loc, parent = re.search(r"file_location_id=(\d+)", v), re.search(r"parent_frame_id=(\d+)", v)
    frames[k] = (locs.get(int(loc.group(1))) if loc else None, int(parent.group(1)) if parent else 0)
  out = {}
  for k in frames:
    chain, seen, f = [], set(), k
    while f in frames and f not in seen:
      seen.add(f)
      chain.append(frames[f][0])
      f = frames[f][1]
    chain = [c for c in chain if c]
    ours = [c for c in chain if re.search(prefer, c)]
    out[k] = (ours or chain or ["?"])[0]
  return out


def parse_module(text: str):
  """HLO text -> (instructions {name: line}, computations {name: [lines]})."""
  instrs, comps, current = {}, {}, None
  for line in text.splitlines():
    if current is None:
      m = _COMP.match(line)
      if m and not line[0].isspace():   # computation headers start at column 0, instructions are indented
        current = m.group(1)
        comps[current] = []
      continue
    if line.strip() == "}":
      current = None
      continue
    comps[current].append(line)
    m = _INSTR.match(line)
    if m:
      instrs[m.group(1)] = line
  return instrs, comps


def profile_names(path: str, classes: set[str], top: int) -> list[str]:
  """Kernel names of a profile_summary markdown table (`| \\`name\\` | class | ...`), in its order."""
  names = []
  for line in open(path):
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) >= 3 and cells[0].startswith("`") and (not classes or cells[1] in classes):
      names.append(cells[0].strip("`"))
  return names[:top]


def describe(name: str, instrs: dict, comps: dict, max_lines: int, frames: dict | None = None) -> str:
  # a kernel is named after its instruction with the numeric suffix's "." as "_" (fusion.383 -> fusion_383)
  line = instrs.get(name) or instrs.get(re.sub(r"_(\d+)$", r".\1", name))
  if line is None:
    return f"## {name}\nnot in this module\n"
  shape = line.split("=", 1)[1].strip().split(" ")[0]
  out = [f"## {name}", f"shape: {shape}"]
  called = _CALLS.search(line)
  body = comps.get(called.group(1), []) if called else []
  seen = []
  for b in [line] + body:
    m = _OP_NAME.search(b)
    if not m:
      continue
    f = _FRAME.search(b)
    op = m.group(1) + (f"  ({frames[int(f.group(1))]})" if frames and f and int(f.group(1)) in frames else "")
    if op not in seen:
      seen.append(op)
  out.append("jax ops:")
  out += [f"  {op}" for op in seen[:12]] + ([f"  ... {len(seen) - 12} more"] if len(seen) > 12 else [])
  out.append("fused computation:" if body else "instruction:")
  for b in (body or [line])[:max_lines]:
    out.append("  " + re.sub(r",?\s*metadata=\{[^}]*\}", "", b.strip())[:220])
  if len(body) > max_lines:
    out.append(f"  ... {len(body) - max_lines} more lines")
  return "\n".join(out) + "\n"


def find_module(dump: str, pattern: str) -> str:
  """The largest after-optimizations HLO text in `dump` whose file name matches `pattern`."""
  files = [f for f in glob.glob(os.path.join(dump, "*after_optimizations.txt")) if re.search(pattern, f)]
  if not files:
    sys.exit(f"hlo_fusions: no *after_optimizations.txt matching {pattern!r} in {dump}; dump with "
             f"XLA_FLAGS='--xla_dump_to={dump} --xla_dump_hlo_as_text'.")
  return max(files, key=os.path.getsize)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--dump", required=True, help="the --xla_dump_to directory")
  ap.add_argument("--module", default=".", help="regex on the dump's file names (default: the largest module)")
  ap.add_argument("--profile", default=None, help="a profile_summary markdown file whose kernels to describe")
  ap.add_argument("--classes", default="other,copy", help="profile classes to take (comma list; empty: all)")
  ap.add_argument("--top", type=int, default=25)
  ap.add_argument("--names", default="", help="comma list of fusion names (instead of, or besides, --profile)")
  ap.add_argument("--lines", type=int, default=14, help="fused-computation lines printed per fusion")
  ap.add_argument("--prefer", default=r"rcm_jax|pallas_kernels",
                  help="regex of the source files whose lines name an op (the innermost such frame)")
  args = ap.parse_args(argv)
  names = [n for n in args.names.split(",") if n]
  if args.profile:
    names += profile_names(args.profile, {c for c in args.classes.split(",") if c}, args.top)
  if not names:
    sys.exit("hlo_fusions: no fusion names: pass --profile FILE or --names A,B.")
  path = find_module(args.dump, args.module)
  text = open(path).read()
  instrs, comps = parse_module(text)
  frames = parse_frames(text, args.prefer)
  print(f"# {len(names)} fusions of {os.path.basename(path)}\n")
  for n in names:
    print(describe(n, instrs, comps, args.lines, frames))


if __name__ == "__main__":
  main()
