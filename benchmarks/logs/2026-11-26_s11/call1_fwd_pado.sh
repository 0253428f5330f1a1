# issue 3's forward cases through flash_attention's plain forward: o written padded and sliced (AB=pado)
# against unpadded (the current code), alternating, one machine
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
for v in pado none pado none; do
  AB=$([ $v = pado ] && echo pado) SCRIPT=benchmarks/attention.py timeout 140 python3 benchmarks/logs/2026-11-26_s11/ab_driver.py \
    --bench --backend mosaic --sizes 15600,16384,18720 --modes fwd --tf-cases 5:1,6:3 --skip-decode --out /tmp/b_$v \
    > $OUT/fwd_${v}_$SECONDS.log 2>&1
  echo "== $v"; grep -E " fwd " $OUT/fwd_${v}_*.log | tail -n +1 | grep "mosaic " | cut -c1-150
done
