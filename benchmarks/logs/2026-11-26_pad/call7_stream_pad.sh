# streaming 2-step noisy, A/B of the unpadded Mosaic kernels (none) against the padded ones (AB=pad), same
# machine, alternating
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
for v in pad none pad none; do
  AB=$([ $v = pad ] && echo pad) SCRIPT=benchmarks/streaming.py timeout 170 python3 benchmarks/logs/2026-11-26_pad/ab_driver.py \
    --out /tmp/s_$v --patterns chunkwise --rows 2:noisy:2 --repeats 2 > $OUT/stream_$v.log 2>&1
  echo "== $v"; grep -E "^AB|^\| pallas|Error|error" $OUT/stream_$v.log | cut -c1-250 | tail -4
done
