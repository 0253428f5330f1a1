# frame-wise streaming (21 one-frame chunks), 2-step noisy context (first chunk 2 steps), DiT only
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
timeout 430 python3 benchmarks/streaming.py --out $OUT/stream --patterns framewise --rows 2:noisy:2 --repeats 2 \
  > $OUT/stream.log 2>&1
grep -E "^\| pallas|Error|error|compil" $OUT/stream.log | cut -c1-250 | tail -30
find $OUT -size +5M -delete
