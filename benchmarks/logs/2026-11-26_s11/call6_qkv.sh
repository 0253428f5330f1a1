# q/k/v projection whose tangent / backward takes one product per linear (new, `layers.fused_linears`) against
# the fused product whose backward concatenates the cotangents (AB=qkv): the TF step alternating, then TF-dCM
# and TF-sCM with the new code, one machine
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
TS="--critic_steps 1 --min_frames 21 --remat attention_out_only"
for v in qkv none qkv none; do
  AB=$([ $v = qkv ] && echo qkv) timeout 120 python3 benchmarks/logs/2026-11-26_s11/ab_driver.py $TS --recipes tf --iters 5 \
    --out /tmp/t_$v > $OUT/tf_${v}_$SECONDS.log 2>&1
  echo "== $v"; ls -t $OUT/tf_${v}_*.log | head -1 | xargs grep -hE "^tf .*MFU|Error" | cut -c1-160
done
timeout 230 python3 benchmarks/train_step.py $TS --recipes tf_dcm,tf_scm --iters 3 --out /tmp/cm > $OUT/cm.log 2>&1
grep -E "^tf_.*MFU|sCM|Error" $OUT/cm.log | cut -c1-200
