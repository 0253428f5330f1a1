"""The one-off A/B driver of this log directory (2026-11-26, session 7).

AB=pado makes every Mosaic forward write its o padded to the tile multiple and slice it (`unpadded_o` off),
as before `mosaic.forward(unpadded_o=)`: the A/B for the plain forwards of `flash_attention` and
`flash_attention_stacked`. Then runs SCRIPT (default benchmarks/train_step.py) with the given arguments.
Run from the repo root, e.g.
  AB=pado SCRIPT=benchmarks/attention.py python3 benchmarks/logs/2026-11-26_s11/ab_driver.py --bench ...
"""
import functools, os, runpy, sys
import pallas_kernels.mosaic as M
old = set(filter(None, os.environ.get("AB", "").split(",")))
if "pado" in old:
  _forward = M.forward
  @functools.wraps(_forward)
  def forward(*args, **kwargs):
    kwargs["unpadded_o"] = False
    return _forward(*args, **kwargs)
  M.forward = forward
print("AB old:", sorted(old), flush=True)
script = os.environ.get("SCRIPT", "benchmarks/train_step.py")
sys.argv = [script] + sys.argv[1:]
sys.path.insert(0, "benchmarks")
runpy.run_path(script, run_name="__main__")
