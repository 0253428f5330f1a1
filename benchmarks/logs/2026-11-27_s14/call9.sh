# cProfile of flash_attention's host dispatch at dense 4096 against the direct Mosaic call (call 7 found
# 255-679 us against 63-149 us a call with the same compiled HLO).
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
timeout 150 python3 benchmarks/logs/2026-11-27_s14/probe_profile.py > $OUT/profile.log 2>&1
echo "rc $?"; grep -vE "^\s*$" $OUT/profile.log | cut -c1-170 | head -90
