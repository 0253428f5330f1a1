# SF-DMD on one H100 after trainer.build_state (the state, critic and critic optimizer from one jit: no holes in
# the allocator): 12 latent frames, then 9; Adam's first moment in bf16, remat full, one critic step per student step
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
TS="--recipes sf_dmd --iters 3 --mu_dtype bfloat16 --critic_steps 1"
timeout 320 python3 benchmarks/train_step.py $TS --frames 12 --min_frames 12 --out $OUT/f12_c1 > $OUT/f12_c1.log 2>&1
grep -hE "^sf_dmd|^device|Error|error|memory|bfc" $OUT/f12_c1.log | cut -c1-240 | tail -24
timeout 260 python3 benchmarks/train_step.py $TS --frames 9 --min_frames 9 --out $OUT/f9_c1 > $OUT/f9_c1.log 2>&1
grep -hE "^sf_dmd|^device|Error|error|memory|bfc" $OUT/f9_c1.log | cut -c1-240 | tail -24
find $OUT -size +5M -delete
