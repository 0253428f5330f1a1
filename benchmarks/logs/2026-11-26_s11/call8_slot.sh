# streaming 2-step noisy: each written chunk in its empty slot (new) against the scratch rows and a move after
# the call (AB=slot), alternating, one machine
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
for v in slot none slot none; do
  AB=$([ $v = slot ] && echo slot) SCRIPT=benchmarks/streaming.py timeout 130 python3 benchmarks/logs/2026-11-26_s11/ab_driver.py \
    --out /tmp/s_$v --patterns chunkwise --rows 2:noisy:2 --repeats 2 > $OUT/stream_${v}_$SECONDS.log 2>&1
  echo "== $v"; ls -t $OUT/stream_${v}_*.log | head -1 | xargs grep -hE "^AB|^\| pallas|Error|error" | cut -c1-250 | tail -2
done
