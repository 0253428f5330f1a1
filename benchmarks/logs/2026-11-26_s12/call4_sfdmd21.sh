# SF-DMD on one H100 at the full 21 latent frames after trainer.build_state; Adam's first moment in bf16, remat
# full, one critic step per student step
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader > $OUT/card.txt
timeout 400 python3 benchmarks/train_step.py --recipes sf_dmd --iters 3 --mu_dtype bfloat16 --critic_steps 1 \
  --frames 21 --min_frames 21 --out $OUT/f21_c1 > $OUT/f21_c1.log 2>&1
grep -hE "^sf_dmd|^device|Error|error|memory|bfc" $OUT/f21_c1.log | cut -c1-240 | tail -24
find $OUT -size +5M -delete
