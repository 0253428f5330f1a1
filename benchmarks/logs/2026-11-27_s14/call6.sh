# Dense 4096 forward: call 5 timed flash_attention at 0.48x cuDNN where call 4 (another H100) had 0.92x.
# Paired rounds of the persistent and one-CTA-per-item forwards beside cuDNN, in two processes.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
for i in 1 2; do
  timeout 200 python3 benchmarks/logs/2026-11-27_s14/probe_4096.py > $OUT/probe_$i.log 2>&1
  echo "probe $i rc $?"; grep -E "median" $OUT/probe_$i.log | sed 's/  \+/ /g' | cut -c1-160
done
