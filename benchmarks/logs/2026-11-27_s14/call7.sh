# Why flash_attention's dense 4096 forward took 0.27-0.50 ms where the Mosaic kernel called directly took
# 0.18-0.19 ms (call 6): host dispatch time, the compiled HLO, and XLA's command buffers switched off.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
timeout 150 python3 benchmarks/logs/2026-11-27_s14/probe_dispatch.py > $OUT/probe_default.log 2>&1
echo "default rc $?"; grep -E "median|dispatch" $OUT/probe_default.log | sed 's/  \+/ /g' | cut -c1-160
mkdir -p $OUT/nocb
OUT=$OUT/nocb XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 150 python3 benchmarks/logs/2026-11-27_s14/probe_dispatch.py > $OUT/probe_nocb.log 2>&1
echo "no command buffers rc $?"; grep -E "median|dispatch" $OUT/probe_nocb.log | sed 's/  \+/ /g' | cut -c1-160
rm -rf $OUT/nocb
grep -cE "^\s+\S+ = " $OUT/hlo_*.txt
