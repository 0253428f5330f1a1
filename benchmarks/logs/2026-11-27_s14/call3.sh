# Issue 3, the code as committed: persistent CTAs by default under PERSISTENT_BELOW key tiles a query tile,
# single-run tile masks in the forward, dq and JVP, full store waits. 1) the paired-rounds share of dense and
# A/B against the code before this session; 2) GPU correctness of the Mosaic kernels (the small check cases run
# the persistent forward; "2 intervals in one tile" the general masking).
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
timeout 300 python3 benchmarks/attention.py --mosaic-mask-tune --out $OUT/tune > $OUT/tune.log 2>&1
echo "tune rc $?"; grep -E "share|difference|matmul" $OUT/tune.log | sed 's/  \+/ /g' | cut -c1-200
timeout 270 python3 benchmarks/attention.py --check --backend mosaic --skip-scm \
  --check-only "TF c1-1,D=64,empty rows,2 intervals" --out /tmp/check > $OUT/check.log 2>&1
echo "check rc $?"; grep -E "^check|raised|FAIL" $OUT/check.log | cut -c1-200
