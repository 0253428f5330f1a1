# streaming 2-step noisy: the stacked attention's o padded and sliced (AB=pado) against unpadded (the current
# code), same machine, alternating
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
for v in pado none pado none; do
  AB=$([ $v = pado ] && echo pado) SCRIPT=benchmarks/streaming.py timeout 140 python3 benchmarks/logs/2026-11-26_s11/ab_driver.py \
    --out /tmp/s_$v --patterns chunkwise --rows 2:noisy:2 --repeats 2 > $OUT/stream_${v}_$SECONDS.log 2>&1
  echo "== $v"; grep -E "^\| pallas|Error|error" $OUT/stream_${v}_*.log | cut -c1-250 | tail -2
done
