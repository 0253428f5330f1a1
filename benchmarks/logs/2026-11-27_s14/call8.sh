# Split-KV for grids under two waves (the 1,560-query decode): GPU correctness (forward, gradients through the
# combined lse, JVP), the decode shapes in paired rounds with and without it, and --paired-shares again.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
timeout 200 python3 benchmarks/attention.py --check --backend mosaic --skip-scm --check-only "split-KV,TF c1-1" \
  --out /tmp/check > $OUT/check.log 2>&1
echo "check rc $?"; grep -E "^check|raised|FAIL" $OUT/check.log | cut -c1-200
timeout 150 python3 benchmarks/logs/2026-11-27_s14/probe_decode.py > $OUT/probe_decode.log 2>&1
echo "probe rc $?"; grep -E "median" $OUT/probe_decode.log | sed 's/  \+/ /g' | cut -c1-160
timeout 200 python3 benchmarks/attention.py --paired-shares --backend auto --out /tmp/paired > $OUT/paired.log 2>&1
echo "paired rc $?"; grep -E "median of rounds" $OUT/paired.log | sed 's/  \+/ /g' | cut -c1-160
