#!/usr/bin/env bash
# The accelerator checks, in one call of a lent GPU machine: MoE ÷ dense FFN speed and the
# model's train-step MFU against the device's own matmul peak, default and paper sizes. Each piece writes its table to OUTDIR; a piece that fails does not stop the others.
#   bash bench/gpu.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/mm_jax_gpu}
mkdir -p "$out" && out=$(cd "$out" && pwd)  # absolute: the script changes directory below
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
cd "$(dirname "$0")/.." || exit
nvidia-smi -L
python3 -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'
timeout 240 python3 bench/moe.py --only speed --repeats 20 --cores "$(nproc)" 2>&1 | tee "$out/moe.txt"
timeout 150 python3 bench/model.py --batch 128 --length 64 --configs "default,no_moe;default" \
  2>&1 | tee "$out/model_default.txt"
timeout 180 python3 bench/model.py --batch 16 --length 256 --configs "paper" --repeats 3 \
  2>&1 | tee "$out/model_paper.txt"
