# the chunk-wise streaming rows not measured before: 1 step (noisy, clean; first chunk 1 step), 2-step clean
# (first chunk 2), 4-step noisy (first chunk 4); final code; rows print as they finish
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
timeout 420 python3 benchmarks/streaming.py --out $OUT/stream --patterns chunkwise \
  --rows 1:noisy:1,1:clean:1,2:clean:2,4:noisy --repeats 2 > $OUT/stream.log 2>&1
grep -E "^\| pallas|Error|error" $OUT/stream.log | cut -c1-250
