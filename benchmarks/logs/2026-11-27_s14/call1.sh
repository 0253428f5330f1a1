# Issue 3: the Mosaic kernels' single-run tile masks, read-only store waits and snake-ordered persistent CTAs.
# 1) GPU correctness of every kernel (compiled) against the XLA reference; 2) the kernels alone, new options
# against the code before them, alternating in one process.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
timeout 150 python3 benchmarks/attention.py --check --backend mosaic --skip-scm --out /tmp/check > $OUT/check.log 2>&1
echo "check rc $?"; grep -E "check|FAIL|raised" $OUT/check.log | cut -c1-200 | tail -40
timeout 400 python3 benchmarks/attention.py --mosaic-mask-tune --out /tmp/tune > $OUT/tune.log 2>&1
echo "tune rc $?"; grep -vE "^\s*$" $OUT/tune.log | cut -c1-200 | tail -120
