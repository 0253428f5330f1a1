# issue 3's forward cases (TF c1-1 15,600 and c3-3 18,720 tokens, dense at 15,600 / 16,384 / 18,720) through
# flash_attention with the Mosaic kernels: padded operands (AB=pad) against unpadded, alternating, one machine
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
for v in pad none pad none; do
  AB=$([ $v = pad ] && echo pad) SCRIPT=benchmarks/attention.py timeout 140 python3 benchmarks/logs/2026-11-26_pad/ab_driver.py \
    --bench --backend mosaic --sizes 15600,16384,18720 --modes fwd --tf-cases 5:1,6:3 --skip-decode --out /tmp/b_$v \
    > $OUT/fwd_$v.log 2>&1
  echo "== $v"; grep -E "fwd " $OUT/fwd_$v.log | cut -c1-140
done
