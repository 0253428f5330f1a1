# the forward's o unpadded outside autodiff (flash_attention's plain forward, the streaming cache reads):
# GPU check of two ragged cases, issue 3's forward cases, and streaming 2-step noisy
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
timeout 150 python3 benchmarks/attention.py --check --backend mosaic --skip-scm --check-only "dense ragged,window+sink" \
  --out /tmp/c > $OUT/check.log 2>&1; grep "^check" $OUT/check.log | cut -c1-160
timeout 120 python3 benchmarks/attention.py --bench --backend mosaic --sizes 15600,16384,18720 --modes fwd \
  --tf-cases 5:1,6:3 --skip-decode --out /tmp/b > $OUT/fwd.log 2>&1; grep -E "(mosaic|cudnn) +fwd" $OUT/fwd.log | cut -c1-140
timeout 170 python3 benchmarks/streaming.py --out /tmp/s --patterns chunkwise --rows 2:noisy:2 --repeats 2 > $OUT/stream.log 2>&1
grep -E "^\| pallas" $OUT/stream.log
