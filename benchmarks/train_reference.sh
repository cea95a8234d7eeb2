#!/usr/bin/env bash
# Trains the reference CIFAR-10 checkpoints with cnnmod's own `train` command.
# Data: ../shared/datasets/cifar10-train-jpeg.tar.gz (the CIFAR-10 training split as JPEGs).
# Validation rule: the last 10% of each class's images by sorted file name (500 per class,
# files 4500.jpg..4999.jpg) are held out (`--split val`); training uses the other 45,000.
# The epoch log goes to benchmarks/checkpoints/<name>.log; rerun with --resume to continue.
# The committed checkpoints were made on a lent GPU by benchmarks/gpu_session.sh (same command, --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
MODEL=${1:-resnet20}
EPOCHS=${EPOCHS:-20}
shift || true
NAME=$MODEL
case " $* " in *" --no-bn "*) NAME=${MODEL}_nobn ;; esac  # e.g. resnet20 --no-bn --lr 0.02 --warmup 2
PYTHONUNBUFFERED=1 .venv/bin/cnnmod train --model "$MODEL" --data ../shared/datasets/cifar10-train-jpeg.tar.gz \
    --split train --val-split val --epochs "$EPOCHS" --seed 0 \
    --out "benchmarks/checkpoints/cifar10_${NAME}.safetensors" "$@" \
    2> "runs/train_${NAME}.progress" | tee -a "benchmarks/checkpoints/cifar10_${NAME}.log"
