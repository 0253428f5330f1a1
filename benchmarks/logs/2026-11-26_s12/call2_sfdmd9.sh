# SF-DMD on one H100 at 9 latent frames (3 chunks), Adam's first moment in bf16, remat full: one critic step per
# student step, then the paper's 5
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
TS="--recipes sf_dmd --iters 3 --frames 9 --min_frames 9 --mu_dtype bfloat16"
timeout 290 python3 benchmarks/train_step.py $TS --critic_steps 1 --out $OUT/f9_c1 > $OUT/f9_c1.log 2>&1
grep -hE "^sf_dmd|^device|Error|error|memory" $OUT/f9_c1.log | cut -c1-240 | tail -24
timeout 290 python3 benchmarks/train_step.py $TS --critic_steps 5 --out $OUT/f9_c5 > $OUT/f9_c5.log 2>&1
grep -hE "^sf_dmd|^device|Error|error|memory" $OUT/f9_c5.log | cut -c1-240 | tail -24
find $OUT -size +5M -delete
