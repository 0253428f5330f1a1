# Issue 3's table through flash_attention with the final code (persistent forward by default below 64 key tiles
# a query tile: dense 4096 and the TF cases at 15,600 / 18,720 tokens), cuDNN in the same process.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
timeout 420 python3 benchmarks/attention.py --bench --backend auto --sizes 4096,15600,16384,18720 --modes fwd,fb,jvp \
  --tf-cases 5:1,6:3 --out $OUT/bench > $OUT/bench.log 2>&1
echo "bench rc $?"; grep -E "TFLOP|matmul" $OUT/bench.log | grep -vE " (triton|mosaic_fwd) " | sed 's/  \+/ /g' | cut -c1-200
