export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
D=benchmarks/logs/2026-11-26_pad/ab_driver.py
A="--critic_steps 1 --min_frames 21 --recipes tf --remat attention_out_only --iters 5"
python3 benchmarks/attention.py --check --backend mosaic --skip-scm --out $OUT/check 2>&1 | grep -v WARNING | tail -12
for ab in none pad none pad; do
  AB=$([ $ab = pad ] && echo pad) python3 $D $A > $OUT/tf_$ab.log 2>&1; echo "== $ab"; grep -E "^\| tf " $OUT/tf_$ab.log
done
