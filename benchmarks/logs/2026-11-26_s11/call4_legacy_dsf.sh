# weight slices: the probe with legacy cuBLAS GEMMs (cuBLASLt off), which dynamic-slice fusion can take, then
# the TF step without and with those flags, one machine
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
PROBE_CASES=legacy,legacy_dsf timeout 200 python3 benchmarks/logs/2026-11-26_s11/slice_probe.py > $OUT/slice_probe.txt 2>&1
cut -c1-300 $OUT/slice_probe.txt
TS="--critic_steps 1 --min_frames 21 --recipes tf --remat attention_out_only --iters 5"
timeout 150 python3 benchmarks/train_step.py $TS --out /tmp/t0 > $OUT/tf_base.log 2>&1
XLA_FLAGS="--xla_gpu_enable_cublaslt=false --xla_gpu_enable_triton_gemm=false --xla_gpu_enable_dynamic_slice_fusion=true" \
  timeout 150 python3 benchmarks/train_step.py $TS --out /tmp/t1 > $OUT/tf_legacy_dsf.log 2>&1
grep -E "MFU" $OUT/tf_*.log | grep -v "^.*| TF" | cut -c1-220
