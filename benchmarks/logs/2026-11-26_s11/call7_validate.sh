# all of this session's code on one machine: the TF step twice, then streaming (2-step noisy, 4-step clean) with
# a profile of the 2-step row's chunks
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
TS="--critic_steps 1 --min_frames 21 --remat attention_out_only"
for r in 1 2; do
  timeout 120 python3 benchmarks/train_step.py $TS --recipes tf --iters 5 --out /tmp/t$r > $OUT/tf_$r.log 2>&1
  grep -hE "^tf .*MFU|Error" $OUT/tf_$r.log | cut -c1-160
done
timeout 200 python3 benchmarks/streaming.py --out $OUT/stream --patterns chunkwise --rows 2:noisy:2,4:clean \
  --repeats 2 --profile > $OUT/stream.log 2>&1
grep -E "^\| pallas|Error|error" $OUT/stream.log | cut -c1-250
rm -rf $OUT/stream/trace* 2>/dev/null; find $OUT -size +5M -delete
