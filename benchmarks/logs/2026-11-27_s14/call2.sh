# Issue 3: the masked forward / backward / JVP against dense attention of the same length, and the kernel
# options (single-run tile masks, read-only store waits, persistent CTAs) against the code before them, in
# paired rounds (the run order rotated each round) to cancel the clock drift seen in call 1.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
timeout 540 python3 benchmarks/attention.py --mosaic-mask-tune --out $OUT/tune > $OUT/tune.log 2>&1
echo "tune rc $?"; grep -E "share|difference|matmul" $OUT/tune.log | sed 's/  \+/ /g' | cut -c1-200
