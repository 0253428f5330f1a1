# TF step: A/B of XLA's dynamic-slice fusion flag, then one profiled step with an HLO dump (hlo_fusions.py)
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
A="--critic_steps 1 --min_frames 21 --recipes tf --remat attention_out_only"
for v in base dsf; do
  if [ $v = dsf ]; then export XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true; else unset XLA_FLAGS; fi
  python3 benchmarks/train_step.py $A --iters 5 > $OUT/tf_$v.log 2>&1; echo "== $v"; grep -E "^\| tf " $OUT/tf_$v.log
done
export XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text"
python3 benchmarks/train_step.py $A --iters 1 --profile --out /tmp/prof > $OUT/tf_prof.log 2>&1
python3 benchmarks/profile_summary.py /tmp/prof/trace_tf --top 60 --md $OUT/profile_tf.md > /dev/null
unset XLA_FLAGS
python3 benchmarks/hlo_fusions.py --dump /tmp/dump --module jit_fn --profile $OUT/profile_tf.md --top 30 --lines 60 > $OUT/fusions.md 2>&1
tail -3 $OUT/fusions.md
