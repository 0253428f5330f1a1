# the TF step under the profiler, unpadded (this session) then padded (AB=pad), one step each
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
D=benchmarks/logs/2026-11-26_pad/ab_driver.py
A="--critic_steps 1 --min_frames 21 --recipes tf --remat attention_out_only --iters 2 --profile"
for ab in none pad; do
  AB=$([ $ab = pad ] && echo pad) python3 $D $A --out /tmp/$ab > $OUT/tf_$ab.log 2>&1
  grep -E "^\| tf " $OUT/tf_$ab.log
  python3 benchmarks/profile_summary.py /tmp/$ab/trace_tf --top 90 --md $OUT/profile_$ab.md > /dev/null
done
