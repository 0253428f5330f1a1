# streaming 2-step noisy, A/B of XLA's dynamic-slice fusion (the scanned layers' weight slices read in place
# by the GEMMs instead of copied), same machine, alternating
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
for v in base dsf base dsf; do
  if [ $v = dsf ]; then export XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true; else unset XLA_FLAGS; fi
  timeout 170 python3 benchmarks/streaming.py --out /tmp/s_$v --patterns chunkwise --rows 2:noisy:2 --repeats 2 \
    > $OUT/stream_$v.log 2>&1
  echo "== $v"; grep -E "^# NVIDIA|^\| pallas|Error|error" $OUT/stream_$v.log | cut -c1-250 | tail -4
done
