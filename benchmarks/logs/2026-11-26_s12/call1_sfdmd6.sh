# SF-DMD on one H100 at 6 latent frames (the 21-frame step needs 110 GiB), Adam's first moment in bf16
# (optim.mu_dtype), remat full, one critic step per student step; then 9 frames if time is left
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
TS="--recipes sf_dmd --critic_steps 1 --iters 3"
timeout 330 python3 benchmarks/train_step.py $TS --frames 6 --min_frames 6 --mu_dtype bfloat16 --out $OUT/f6_mubf16 > $OUT/f6_mubf16.log 2>&1
grep -hE "^sf_dmd|^device|Error|error|memory" $OUT/f6_mubf16.log | cut -c1-240 | tail -24
timeout 240 python3 benchmarks/train_step.py $TS --frames 6 --min_frames 6 --out $OUT/f6_mu32 > $OUT/f6_mu32.log 2>&1
grep -hE "^sf_dmd|^device|Error|error|memory" $OUT/f6_mu32.log | cut -c1-240 | tail -24
find $OUT -size +5M -delete
