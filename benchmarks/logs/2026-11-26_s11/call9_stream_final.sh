# the final code's streaming rows (2-step noisy, 4-step clean), on call 8's machine
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
timeout 480 python3 benchmarks/streaming.py --out $OUT/stream --patterns chunkwise --rows 2:noisy:2,4:clean \
  --repeats 2 > $OUT/stream.log 2>&1
grep -E "^\| pallas|Error|error" $OUT/stream.log | cut -c1-250
