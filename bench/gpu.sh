#!/usr/bin/env bash
# The GPU checks in one call of one H100, each against a matmul peak measured in the same run, in
# bfloat16 and float32: the paper body's MFU (bench/model.py), the whole train step's MFU on batches
# saved beforehand (bench/gpu_step.py) and MoE ÷ dense FFN (bench/moe.py, dropless rows through
# jax.lax.ragged_dot and tokamax's Pallas kernels). The GPU machine has no TensorFlow and no network,
# so a CPU machine prepares what it needs first:
#
#   bash bench/gpu.sh prepare [DIR] [save flags]   # CPU, with TensorFlow: DIR (default .gpu) gets
#                                                  # the saved batches and the wheels to install
#   bash bench/gpu.sh run [DIR] [OUTDIR]           # GPU: DIR shipped with the tree; tables to OUTDIR
#
# `save flags` replace the default batches (:paper shapes with 16 experts, embedded data, one GPU):
# any `python -m mm_jax.data.arrays save` flags but --out. MM_JAX_GPU_SMOKE=1 runs every piece at
# tiny sizes (the :tiny config; seconds of work each), e.g. on a CPU to check the script itself.
# Each piece has its own time limit (together about 13 minutes) and writes its table to OUTDIR; a
# piece that fails or runs out of time does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.." || exit
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mode=${1:-run}
dir=${2:-.gpu}
smoke=${MM_JAX_GPU_SMOKE:-}

# What the GPU machine lacks (mm_jax's config library; tokamax and its needs), as wheels for its
# Python 3.12 on x86-64.
WHEELS=(ml-collections==1.1.0 tokamax==0.0.12 qwix==0.1.8 einshape==1.0 typeguard==2.13.3
  immutabledict==4.3.1 tensorboardx==2.6.5 pydantic==2.13.4 pydantic-core==2.46.4
  annotated-types==0.7.0 typing-inspection==0.4.2)

if [ "$mode" = prepare ]; then
  shift $(($# < 2 ? $# : 2))
  mkdir -p "$dir/wheels" || exit
  if [ -n "$smoke" ]; then
    save=(--config=configs/multimodel.py:tiny --steps=2)
  else
    # :paper's shapes on one 80 GB card: the Adam state of its 2 x 120 experts would not fit.
    save=(--config=configs/multimodel.py:paper --config.data.mixture=embedded
      --config.mesh.expert=1 --config.model.moe.num_experts=16 --config.data.global_batch_size=32
      --steps=3)
  fi
  [ $# -gt 0 ] && save=("$@")
  python3 -m mm_jax.data.arrays save "${save[@]}" --out="$dir/batches" || exit
  platforms=()
  for n in 28 27 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d "$dir/wheels" \
    "${WHEELS[@]}" || exit
  du -sh "$dir"/*
  exit
fi
[ "$mode" = run ] || { echo "usage: bash bench/gpu.sh prepare|run [DIR] [...]" >&2; exit 2; }

out=${3:-/tmp/mm_jax_gpu}
mkdir -p "$out" && out=$(cd "$out" && pwd)
export MM_JAX_BENCH_RESULTS_DIR="$out"  # each bench's table, beside its log
nvidia-smi -L 2>/dev/null
if ! python3 -c "import ml_collections, tokamax" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/mm_jax_site "$dir"/wheels/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/mm_jax_site"
fi
python3 -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'
python3 -c 'import tokamax; print("tokamax", tokamax.__version__)' || echo "no tokamax"

if [ -n "$smoke" ]; then
  body=(--configs tiny --batch 2 --length 16 --repeats 1 --peak_n 256)
  step=(--steps 1 --peak_n 256 --peak_repeats 1)
  moe=(--size smoke --repeats 1)
else
  body=(--configs paper --batch 16 --length 256 --repeats 3 --peak_n 8192)
  step=(--steps 10 --peak_n 8192 --peak_repeats 5)
  moe=(--repeats 10)
fi

# Most wanted first: each bar's bf16 figure, then the float32 ones.
piece() {  # seconds, log name, command...
  local limit=$1 name=$2
  shift 2
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  echo "== $name: exit ${PIPESTATUS[0]}"
}
piece 200 body python3 bench/model.py "${body[@]}" --dtypes bfloat16,float32 --skip_depthwise
piece 120 moe_bf16 python3 bench/moe.py --only speed --dtype bfloat16 --ragged xla,tokamax \
  --cores "$(nproc)" "${moe[@]}"
piece 200 step_bf16 python3 bench/gpu_step.py --batches "$dir/batches" --dtypes bfloat16 "${step[@]}"
piece 160 step_f32 python3 bench/gpu_step.py --batches "$dir/batches" --dtypes float32 "${step[@]}"
piece 100 moe_f32 python3 bench/moe.py --only speed --dtype float32 --ragged xla,tokamax \
  --cores "$(nproc)" "${moe[@]}"
ls "$out"
