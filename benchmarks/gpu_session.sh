#!/usr/bin/env bash
# One time-boxed session on a lent GPU machine (the `device` tool): trains the three reference
# CIFAR-10 checkpoints side by side and exercises the CUDA paths of issue #7 meanwhile.
#
#   OUT=/somewhere BUDGET=470 benchmarks/gpu_session.sh
#
# The lent machine sees only the repository: copy ../shared/datasets/cifar10-train-jpeg.tar.gz
# into gpu_data/ (ignored) and carry it. Training epochs are chosen from a short calibration so
# that every run ends BUDGET seconds after the start; what matters lands in $OUT (the device
# tool brings back at most 8 files): session.log, scale_gpu.json, three train logs, three
# checkpoints. Runs on the machine's own python3 (its torch, not our pin), with src/ on the path.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_out}
WORK=${WORK:-runs/gpu_work}
DATA=${DATA:-gpu_data/cifar10-train-jpeg.tar.gz}
BUDGET=${BUDGET:-470}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
MAX_EPOCHS=${MAX_EPOCHS:-200}
TRAIN=${TRAIN:-"0 1 2"}    # which of MODELS to train (indices)
CHECKS=${CHECKS:-all}      # all, or nccl (only the torchrun nccl check)
SCALE_IMAGES=${SCALE_IMAGES:-10000}
CAL_IMAGES=${CAL_IMAGES:-5120}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
T0=$(date +%s)
LOG=$OUT/session.log
say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

say "environment"
{ nvidia-smi -L; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; nproc; } >>"$LOG" 2>&1

MODELS=("resnet20" "resnet32" "resnet20 --no-bn")
NAMES=("resnet20" "resnet32" "resnet20_nobn")
EXTRA=("${EXTRA0:-}" "" "--lr 0.02 --warmup 2")  # without BatchNorm lr 0.1 diverges (NaN within 60 steps on CPU)

say "calibrating (three models side by side)"
for i in $TRAIN; do
    OMP_NUM_THREADS=2 $PY benchmarks/gpu_calibrate.py ${MODELS[$i]} --device "$DEVICE" --images "$CAL_IMAGES" \
        $(echo "${EXTRA[$i]}" | grep -o -- '--batch-size [0-9]*') >"$WORK/cal_$i.json" 2>>"$LOG" &
done
wait
cat "$WORK"/cal_*.json >>"$LOG"

for i in $TRAIN; do
    # 45,000 training images; 1.3x margin for sharing the GPU with the checks; 40 s for loading the
    # data, the per-epoch validation and the final evaluation.
    EPOCHS=$($PY -c "import json,sys,time; s=json.load(open('$WORK/cal_$i.json'))['seconds_per_image']; \
left=$T0+$BUDGET-time.time()-40; print(max(1, min($MAX_EPOCHS, int(left/(s*45000*1.3+0.5)))))" 2>>"$LOG" || echo 0)
    say "training ${NAMES[$i]} for $EPOCHS epochs"
    if [ "$EPOCHS" -gt 0 ]; then
        ( OMP_NUM_THREADS=2 timeout $(( T0 + BUDGET + 20 - $(date +%s) )) $PY -m cnnmod train --model ${MODELS[$i]} \
            --data "$DATA" --split train --val-split val --epochs "$EPOCHS" --seed 0 --device "$DEVICE" \
            --out "$WORK/cifar10_${NAMES[$i]}.safetensors" ${EXTRA[$i]} 2>"$WORK/progress_$i.txt" \
            | tee "$OUT/cifar10_${NAMES[$i]}.log" >/dev/null
          cp "$WORK/cifar10_${NAMES[$i]}.safetensors" "$OUT/" 2>/dev/null && say "done ${NAMES[$i]}" \
            || { say "FAILED ${NAMES[$i]}"; tail -3 "$WORK/progress_$i.txt" >>"$LOG"; } ) &
    fi
done

# Checks of issue #7 while the models train, on the committed reference checkpoint.
CKPT=benchmarks/checkpoints/cifar10_resnet20.safetensors
run_check() {  # name, command...
    local name=$1; shift
    say "check $name: $*"
    local t=$(date +%s.%N)
    if "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"; then
        say "check $name: ok in $(python3 -c "import time; print(round(time.time()-$t, 1))") s"
    else
        say "check $name: FAILED"; tail -5 "$WORK/$name.err" >>"$LOG"
    fi
    tail -c 1500 "$WORK/$name.out" >>"$LOG"; echo >>"$LOG"
}
DEC="decompose $CKPT --data $DATA --split train --json"
if [ "$CHECKS" = nccl ]; then
    run_check decompose_cuda env OMP_NUM_THREADS=4 $PY -m cnnmod $DEC --device cuda --out "$WORK/mods_cuda"
    run_check torchrun_nccl_2 timeout 180 $PY -m torch.distributed.run --standalone --nproc_per_node=2 -m cnnmod \
        $DEC --device cuda --out "$WORK/mods_nccl2"
    grep -v "^\s*$" "$WORK/torchrun_nccl_2.err" | grep -i "error\|nccl" | head -20 >>"$LOG"
    run_check nccl2_vs_cuda $PY benchmarks/compare_modules.py "$WORK/mods_nccl2" "$WORK/mods_cuda"
    say "checks finished; waiting for the trainings"; wait; say "all done"; exit 0
fi
run_check decompose_cuda env OMP_NUM_THREADS=4 $PY -m cnnmod $DEC --device cuda --out "$WORK/mods_cuda"
run_check decompose_cpu env OMP_NUM_THREADS=6 $PY -m cnnmod $DEC --device cpu --out "$WORK/mods_cpu"
run_check cuda_vs_cpu $PY benchmarks/compare_modules.py "$WORK/mods_cuda" "$WORK/mods_cpu"
run_check torchrun_nccl_2 timeout 180 $PY -m torch.distributed.run --standalone --nproc_per_node=2 -m cnnmod \
    $DEC --device cuda --out "$WORK/mods_nccl2"
run_check nccl2_vs_cuda $PY benchmarks/compare_modules.py "$WORK/mods_nccl2" "$WORK/mods_cuda"
run_check torchrun_gloo_2 timeout 240 env OMP_NUM_THREADS=3 $PY -m torch.distributed.run --standalone --nproc_per_node=2 \
    -m cnnmod $DEC --device cpu --out "$WORK/mods_gloo2"
run_check gloo2_vs_cpu $PY benchmarks/compare_modules.py "$WORK/mods_gloo2" "$WORK/mods_cpu"
run_check decompose_cuda_bf16 env OMP_NUM_THREADS=4 $PY -m cnnmod $DEC --device cuda --precision bf16 \
    --out "$WORK/mods_bf16"
run_check bf16_vs_fp32 $PY benchmarks/compare_modules.py "$WORK/mods_bf16" "$WORK/mods_cuda"
run_check evaluate_bf16 $PY -m cnnmod evaluate "$WORK/mods_bf16" --data "$DATA" --split val --device cuda --json
run_check evaluate_cuda $PY -m cnnmod evaluate "$WORK/mods_cuda" --data "$DATA" --split val --device cuda --json
run_check evaluate_model_cuda $PY -m cnnmod evaluate "$CKPT" --data "$DATA" --split val --device cuda --json
run_check scale_gpu timeout 240 $PY benchmarks/bench_scale.py --device cuda --images "$SCALE_IMAGES" \
    --json-out "$OUT/scale_gpu.json"

say "checks finished; waiting for the trainings"
wait
say "all done"
