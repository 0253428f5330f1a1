#!/usr/bin/env bash
# The GPU benchmark phases, for the lent device machine (its Python lacks grain / ml_collections / tensorboardX:
# ../shared/tools/gpu_wheels.sh puts them in .whl/, carried with the command). One call runs the phases named,
# in order, each under its own time limit; the results of every phase so far are packed into $OUT/results.tgz
# after each (the device tool returns at most 8 files), the whole log is $OUT/log.txt, and processes that run
# side by side log to $OUT/<phase>_*.log. `timeout -k`: a process that ignores SIGTERM (a handler waiting on a
# long XLA call) is killed 10 s later. `wait` names its PIDs: a bare `wait` also waits for the log's `tee`.
#   bash benchmarks/run_gpu.sh PHASE[:SECONDS] ...
# Phases (the multi-GPU ones need 2 visible GPUs; single-GPU ones pin one card with CUDA_VISIBLE_DEVICES):
#   steps1        train_step.py on 1 GPU: TF-dCM + TF-sCM on GPU 0 while SF-DMD runs on GPU 1 (two processes)
#   fsdp2         train_step.py, mesh fsdp=2, batch 2 (one video per GPU): TF-sCM, SF-DMD
#   fsdp2_sf      train_step.py, mesh fsdp=2, batch 2: SF-DMD alone
#   context2      train_step.py, mesh context=2, batch 1 (Ulysses over the 65,520-token TF sequence): TF-sCM
#   check2        multi_gpu_check.py: toy TF-sCM losses on 1 vs 2 GPUs (fsdp=2, context=2), restore on 1
#   check2_stream check2 while streaming.py (2-step noisy, 4-step clean, chunk-wise) runs on GPU 1
#   stream_remat  streaming.py on GPU 0 while train_step.py TF runs the remat policies on GPU 1
#   remat1        one GPU: train_step.py TF diffusion under remat full, attention_out_only, attention_only (one
#                 process each, one after the other; no retry with fewer frames; POLICIES= picks others)
#   stream1       one GPU: streaming.py chunk-wise 2-step noisy (first chunk 4 and 2 steps), 4-step clean, with a
#                 profile of the first row's first chunks (profile.md); ROWS= picks others, STREAM_ARGS=--decode
#                 adds the Wan VAE decoding each chunk, STREAM_ARGS=--no-gemm_epilogues drops the XLA GEMM flags
#   sfdmd1        one GPU: train_step.py SF-DMD alone
#   cm1           one GPU: train_step.py TF-dCM + TF-sCM under each remat policy of POLICIES (default attention_out_only)
#   kern1         one GPU: attention.py --mosaic-bwd-tune --mosaic-persistent-tune (the backward kernels with and
#                 without the consumers' ping-pong, the forward with one CTA per tile and with persistent CTAs)
# N GPUs (GPUS=4 or 8; RECIPES= picks the recipes, default tf_scm,sf_dmd), one video per GPU:
#   base1         train_step.py on one GPU, the same-machine baseline for the efficiencies: each recipe of RECIPES
#                 on its own card (GPU 0, 1, ...), side by side
#   fsdpN         train_step.py, mesh fsdp=GPUS, batch GPUS, each recipe in its own process (a time limit each)
#   ctxN          train_step.py, mesh fsdp=GPUS/2 x context=2, batch GPUS/2, each recipe in its own process (the
#                 context axis splits each video's sequence, 65,520 tokens for TF-sCM, over 2 GPUs)
#   checkN        multi_gpu_check.py on GPUS GPUs: toy TF-sCM losses under fsdp=GPUS and data=GPUS against 1 GPU,
#                 and each N-GPU checkpoint resumed on 1
# REMAT= sets the base1 / fsdpN / ctxN remat policy: one for all (attention_out_only) or per recipe
# (tf_scm=attention_out_only,sf_dmd=full); default full.
# SF-DMD runs 1 critic update per student update here (the paper's 5 multiplies the rollouts and critic steps).
set -uo pipefail
export OUT=${OUT:-/tmp/out} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 NCCL_NVLS_ENABLE=0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
R=${RES:-/tmp/res}   # the phases' JSON and markdown, packed into $OUT/results.tgz
mkdir -p "$R" "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=index,name,memory.total --format=csv
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
TS="python3 benchmarks/train_step.py --critic_steps 1 --min_frames 9 ${TS_ARGS:-}"   # TS_ARGS=--gemm_epilogues: the A/B
remat() {   # the REMAT policy of recipe $1
  local kv
  case ${REMAT:-full} in
    *=*) for kv in ${REMAT//,/ }; do [ "${kv%%=*}" = "$1" ] && { echo "${kv#*=}"; return; }; done; echo full ;;
    *) echo "${REMAT:-full}" ;;
  esac
}
on() { local gpus=$1; shift; CUDA_VISIBLE_DEVICES=$gpus "$@"; }
RECIPES=${RECIPES:-tf_scm,sf_dmd}; N=${GPUS:-4}; ALL=$(seq -s, 0 $((N - 1)))   # the N-GPU phases' cards
for arg in "$@"; do
  phase=${arg%%:*}; t=${arg#*:}; [ "$t" = "$arg" ] && t=300
  echo "== $phase (limit $t s) $(date -u +%H:%M:%S)"
  case $phase in
    steps1)
      on 0 timeout -k 10 "$t" $TS --out $R/steps1_a --recipes tf_dcm,tf_scm --iters 3 > $OUT/steps1_a.log 2>&1 & a=$!
      on 1 timeout -k 10 "$t" $TS --out $R/steps1_b --recipes sf_dmd --iters 4 > $OUT/steps1_b.log 2>&1 & b=$!
      wait $a $b; tail -n 25 $OUT/steps1_a.log $OUT/steps1_b.log ;;
    fsdp2)
      on 0,1 timeout -k 10 "$t" $TS --out $R/fsdp2 --mesh fsdp=2 --batch 2 --recipes tf_scm,sf_dmd --iters 3 ;;
    fsdp2_sf)
      on 0,1 timeout -k 10 "$t" $TS --out $R/fsdp2_sf --mesh fsdp=2 --batch 2 --recipes sf_dmd --iters 3 ;;
    context2)
      on 0,1 timeout -k 10 "$t" $TS --out $R/context2 --mesh context=2 --recipes tf_scm --iters 3 ;;
    check2)
      on 0,1 timeout -k 10 "$t" python3 benchmarks/multi_gpu_check.py --out $R/check2 --meshes fsdp=2 context=2 ;;
    check2_stream)   # the toy check shares the cards (no preallocation); the stream keeps 80% of GPU 1
      on 0,1 timeout -k 10 "$t" python3 benchmarks/multi_gpu_check.py --out $R/check2 --meshes fsdp=2 context=2 \
        > $OUT/check2.log 2>&1 & a=$!
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 on 1 timeout -k 10 "$t" python3 benchmarks/streaming.py --out $R/stream \
        --patterns chunkwise --rows 2:noisy,4:clean --repeats 2 > $OUT/stream.log 2>&1 & b=$!
      wait $a $b; tail -n 30 $OUT/check2.log $OUT/stream.log ;;
    stream_remat)
      on 0 timeout -k 10 "$t" python3 benchmarks/streaming.py --out $R/stream --patterns chunkwise --rows 2:noisy,4:clean \
        --repeats 2 > $OUT/stream.log 2>&1 & a=$!
      on 1 timeout -k 10 "$t" python3 benchmarks/train_step.py --out $R/remat_dots --recipes tf --remat dots_saveable \
        --iters 3 > $OUT/remat.log 2>&1 & b=$!
      wait $a $b; tail -n 30 $OUT/stream.log $OUT/remat.log ;;
    remat1)
      for pol in ${POLICIES:-full attention_out_only attention_only}; do
        on 0 timeout -k 10 "$t" $TS --out $R/remat_$pol --recipes tf --remat $pol --iters 3 --min_frames 21 \
          > $OUT/remat_$pol.log 2>&1
        tail -n 12 $OUT/remat_$pol.log
      done ;;
    stream1)
      on 0 timeout -k 10 "$t" python3 benchmarks/streaming.py --out $R/stream --patterns chunkwise \
        --rows ${ROWS:-2:noisy,2:noisy:2,4:clean} --repeats 2 --profile ${STREAM_ARGS:-} > $OUT/stream.log 2>&1
      tail -n 60 $OUT/stream.log ;;
    cm1)
      for pol in ${POLICIES:-attention_out_only}; do
        on 0 timeout -k 10 "$t" $TS --out $R/cm_$pol --recipes tf_dcm,tf_scm --remat $pol --iters 3 --min_frames 21 \
          > $OUT/cm_$pol.log 2>&1
        tail -n 14 $OUT/cm_$pol.log
      done ;;
    kern1)
      on 0 timeout -k 10 "$t" python3 benchmarks/attention.py --mosaic-bwd-tune --mosaic-persistent-tune \
        --out $R/kern > $OUT/kern1.log 2>&1
      tail -n 40 $OUT/kern1.log ;;
    sfdmd1)
      on 0 timeout -k 10 "$t" $TS --out $R/sfdmd1 --recipes sf_dmd --iters 3 > $OUT/sfdmd1.log 2>&1
      tail -n 25 $OUT/sfdmd1.log ;;
    base1)
      gpu=0; pids=()
      for rec in ${RECIPES//,/ }; do
        on $gpu timeout -k 10 "$t" $TS --out $R/base1_$rec --recipes $rec --remat $(remat $rec) --iters 3 \
          > $OUT/base1_$rec.log 2>&1 &
        pids+=($!); gpu=$((gpu + 1))
      done
      wait "${pids[@]}"
      for rec in ${RECIPES//,/ }; do tail -n 12 $OUT/base1_$rec.log; done ;;
    fsdpN)
      for rec in ${RECIPES//,/ }; do   # one process each: its own remat policy and a fresh allocator
        on "$ALL" timeout -k 10 "$t" $TS --out $R/fsdp${N}_$rec --mesh fsdp=$N --batch $N --recipes $rec \
          --remat $(remat $rec) --iters 3 > $OUT/fsdp${N}_$rec.log 2>&1
        tail -n 12 $OUT/fsdp${N}_$rec.log
      done ;;
    ctxN)
      for rec in ${RECIPES//,/ }; do
        on "$ALL" timeout -k 10 "$t" $TS --out $R/ctx${N}_$rec --mesh fsdp=$((N / 2)) context=2 --batch $((N / 2)) \
          --recipes $rec --remat $(remat $rec) --iters 3 > $OUT/ctx${N}_$rec.log 2>&1
        tail -n 12 $OUT/ctx${N}_$rec.log
      done ;;
    checkN)
      on "$ALL" timeout -k 10 "$t" python3 benchmarks/multi_gpu_check.py --out $R/check$N --gpus $N \
        --meshes fsdp=$N data=$N > $OUT/check$N.log 2>&1
      tail -n 30 $OUT/check$N.log ;;
    *) echo "unknown phase $phase" ;;
  esac
  echo "== $phase exit $? $(date -u +%H:%M:%S)"
  find "$R" -name "*.xplane.pb" -delete 2>/dev/null   # the perfetto JSON and profile.md stay
  tar czf "$OUT/results.tgz" -C "$R" . 2>/dev/null
done
true
