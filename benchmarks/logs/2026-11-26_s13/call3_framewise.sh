# frame-wise streaming, the two rows call 1 did not finish: 2-step clean (first chunk 2), which call 2 did not reach;
# one process, alone on the GPU, DiT only
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
timeout 500 python3 benchmarks/streaming.py --out $OUT/stream --patterns framewise --rows 2:clean:2 \
  --repeats 2 > $OUT/stream.log 2>&1
grep -E "^\| pallas|Error|error|warm-up chunk (1|2|21)/" $OUT/stream.log | cut -c1-250 | tail -20
find $OUT -size +5M -delete
