#!/usr/bin/env bash
# The experiments on the lent GPU machine (its Python has jax but not grain / ml_collections / tensorboardX:
# ../shared/tools/gpu_wheels.sh puts those in .whl/, carried with the command). Each step resumes, so a second
# call on a still-warm machine continues where a first one stopped. Results go to $OUT/results.
#   bash experiments/run_gpu.sh <seconds budget> [steps...]     steps: step_time dcm_vs_scm sf_ablation
set -uo pipefail
budget=${1:-540}; shift || true
steps=${*:-step_time dcm_vs_scm sf_ablation}
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export JAX_COMPILATION_CACHE_DIR=$PWD/runs/.jax_cache OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/results" runs
left() { echo $(( budget - ($(date +%s) - start) )); }
for s in $steps; do
  t=$(left); [ "$t" -gt 20 ] || { echo "== no time left for $s"; break; }
  echo "== $s ($t s left) $(date -u +%H:%M:%S)"
  case $s in
    step_time)  timeout "$t" python3 experiments/step_time.py --root runs/step_time --steps 40 --results "$OUT/results" ;;
    dcm_vs_scm) timeout "$t" python3 experiments/dcm_vs_scm.py --root runs/exp --preset gpu --jobs 6 --results "$OUT/results" ;;
    sf_ablation) timeout "$t" python3 experiments/sf_ablation.py --root runs/exp --preset gpu --jobs 9 --seeds 0,1 \
                   --results "$OUT/results" ;;
  esac
  echo "== $s exit $?"
done
nvidia-smi --query-gpu=name,memory.used --format=csv > "$OUT/results/gpu.txt" 2>&1
mkdir -p "$OUT/logs" && cp -r runs/exp/logs runs/exp/logs_sf "$OUT/logs/" 2>/dev/null
find runs/exp -name curve.json | tar czf "$OUT/curves.tgz" -T - 2>/dev/null
find runs/exp -path '*eval*/metrics.json' | tar czf "$OUT/evals.tgz" -T - 2>/dev/null
true
