# RoPE as one elementwise pass (new) against the stack of the rotated halves (AB=rope): the TF step alternating,
# then the 2-step stream, one machine
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
TS="--critic_steps 1 --min_frames 21 --recipes tf --remat attention_out_only --iters 5"
for v in rope none rope none; do
  AB=$([ $v = rope ] && echo rope) timeout 140 python3 benchmarks/logs/2026-11-26_s11/ab_driver.py $TS --out /tmp/t_$v \
    > $OUT/tf_${v}_$SECONDS.log 2>&1
  echo "== $v"; grep -hE "^AB|^tf .*MFU" $OUT/tf_${v}_*.log | tail -1 | cut -c1-160
done
for v in rope none; do
  AB=$([ $v = rope ] && echo rope) SCRIPT=benchmarks/streaming.py timeout 140 python3 benchmarks/logs/2026-11-26_s11/ab_driver.py \
    --out /tmp/s_$v --patterns chunkwise --rows 2:noisy:2 --repeats 2 > $OUT/stream_${v}.log 2>&1
  echo "== stream $v"; grep -E "^\| pallas|Error|error" $OUT/stream_${v}.log | cut -c1-250 | tail -2
done
