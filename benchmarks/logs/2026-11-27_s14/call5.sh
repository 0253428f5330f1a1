# Issue 3's ratios in paired rounds through flash_attention (final code): the masked fwd+bwd share of dense at
# the same length, and the forward / fwd+bwd against cuDNN (dense and the streaming decode shapes).
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
timeout 400 python3 benchmarks/attention.py --paired-shares --backend auto --out $OUT/paired > $OUT/paired.log 2>&1
echo "paired rc $?"; grep -vE "^\s*$|WARNING" $OUT/paired.log | sed 's/  \+/ /g' | cut -c1-200
