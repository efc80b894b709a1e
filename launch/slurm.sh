#!/usr/bin/env bash
# Trains mm_jax on a SLURM GPU cluster: one jax.distributed process per GPU (or per node), with the
# first node of the allocation as coordinator. One file plays three stages, so what sbatch runs and
# what each task runs are visible (and dry-runnable) in one place:
#   submit (default, on the login node) -> sbatch --wrap this script with --stage=job
#   job    (the batch step, first node)  -> srun this script with --stage=task on every task
#   task   (every process)               -> exec python -m mm_jax.main with its process id
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
# shellcheck source=launch/lib.sh
source "$HERE/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/slurm.sh [options] [-- flags for mm_jax.main]

Submits an sbatch job that runs `python -m mm_jax.main` as one process per GPU (or per node) with
jax.distributed: coordinator = first host of $SLURM_JOB_NODELIST (scontrol show hostnames),
process id = $SLURM_PROCID, number of processes = $SLURM_NTASKS. The repo and the workdir must be
on a filesystem every node sees.

Options (--flag=value or --flag value):
  --nodes=N                  nodes to allocate (default 1)
  --gpus-per-node=G          GPUs per node (default 8)
  --per=gpu|node             one process per GPU (default; Slurm binds one GPU to each task) or
                             one process per node seeing all its GPUs
  --partition=NAME           sbatch --partition (default: the cluster's default)
  --account=NAME             sbatch --account (default: none)
  --time=LIMIT               sbatch --time, e.g. 24:00:00 (default: the partition's limit)
  --job-name=NAME            sbatch --job-name (default mm_jax)
  --sbatch-arg=ARG           extra sbatch argument, repeatable (e.g. --sbatch-arg=--qos=high)
  --config=PATH[:VARIANT]    config file (default configs/multimodel.py), relative to the repo
  --workdir=DIR              checkpoints and TensorBoard logs (required; shared filesystem or gs://)
  --log-dir=DIR              batch log %x-%j.out and one log per task %x-%j-task%t.out
                             (default WORKDIR/slurm-logs)
  --port=PORT                coordinator port (default: 61440 + SLURM_JOB_ID mod 4096, as JAX does)
  --python=PATH              Python interpreter with mm_jax installed (default python3)
  --dry-run                  print every command (one per line) and execute nothing; the job
                             stage still runs `scontrol show hostnames`, which only reads
  -h, --help                 this help
Internal (set by the stage before):
  --stage=submit|job|task    which stage to run (default submit)
  --coordinator=HOST:PORT    the task stage's coordinator address

Everything after `--` is passed to every process, e.g. -- --config.data.data_dir=/shared/tfds
Resuming: submit the same command again; the trainer restores the newest checkpoint in --workdir.
EOF
}

STAGE=submit
NODES=1
GPUS_PER_NODE=8
PER=gpu
PARTITION=""
ACCOUNT=""
TIME_LIMIT=""
JOB_NAME=mm_jax
SBATCH_EXTRA=()
CONFIG=configs/multimodel.py
WORKDIR=""
LOG_DIR=""
PORT=""
PYTHON=python3
COORDINATOR=""

set_switch() { return 1; }

set_option() {
  case $1 in
    --stage) STAGE=$2 ;;
    --nodes) NODES=$2 ;;
    --gpus-per-node) GPUS_PER_NODE=$2 ;;
    --per) PER=$2 ;;
    --partition) PARTITION=$2 ;;
    --account) ACCOUNT=$2 ;;
    --time) TIME_LIMIT=$2 ;;
    --job-name) JOB_NAME=$2 ;;
    --sbatch-arg) SBATCH_EXTRA+=("$2") ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --log-dir) LOG_DIR=$2 ;;
    --port) PORT=$2 ;;
    --python) PYTHON=$2 ;;
    --coordinator) COORDINATOR=$2 ;;
    *) return 1 ;;
  esac
}

parse_args "$@"
require_choice --stage "$STAGE" submit job task
require_int --nodes "$NODES" 1
require_int --gpus-per-node "$GPUS_PER_NODE" 1
require_choice --per "$PER" gpu node
require_value --config "$CONFIG"
require_value --workdir "$WORKDIR"
require_value --python "$PYTHON"
if [[ -n $PORT ]]; then
  require_int --port "$PORT" 1
  ((PORT <= 65535)) || die "--port must be <= 65535, got '$PORT'"
fi
WORKDIR=$(absolute_path "$WORKDIR")
LOG_DIR=$(absolute_path "${LOG_DIR:-$WORKDIR/slurm-logs}")

# The options every later stage needs, passed along explicitly (sbatch runs a spooled copy of this
# script on one node, so nothing may depend on the submitting shell's state).
forwarded_options() {
  printf '%s\n' "--config=$CONFIG" "--workdir=$WORKDIR" "--log-dir=$LOG_DIR" "--python=$PYTHON"
  if [[ -n $PORT ]]; then printf '%s\n' "--port=$PORT"; fi
}

submit() {
  local tasks_per_node gpu_binding
  if [[ $PER == gpu ]]; then
    tasks_per_node=$GPUS_PER_NODE
    gpu_binding=--gpus-per-task=1
  else
    tasks_per_node=1
    gpu_binding=--gpus-per-node=$GPUS_PER_NODE
  fi
  local sbatch=(sbatch "--job-name=$JOB_NAME" "--nodes=$NODES" "--ntasks-per-node=$tasks_per_node"
    "$gpu_binding" "--output=$LOG_DIR/%x-%j.out")
  if [[ -n $PARTITION ]]; then sbatch+=("--partition=$PARTITION"); fi
  if [[ -n $ACCOUNT ]]; then sbatch+=("--account=$ACCOUNT"); fi
  if [[ -n $TIME_LIMIT ]]; then sbatch+=("--time=$TIME_LIMIT"); fi
  local options
  mapfile -t options < <(forwarded_options)
  run mkdir -p "$LOG_DIR" # Slurm does not create the directory of --output
  # --wrap, not this file as the batch script: sbatch would run a spooled copy without lib.sh.
  local job_command
  job_command=$(quote_command "$HERE/slurm.sh" --stage=job "${options[@]}" -- "${EXTRA_ARGS[@]}")
  run "${sbatch[@]}" "${SBATCH_EXTRA[@]}" "--wrap=$job_command"
}

job() {
  [[ -n ${SLURM_JOB_NODELIST:-} ]] || die "--stage=job runs inside an sbatch allocation: SLURM_JOB_NODELIST is not set"
  local hosts
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  ((${#hosts[@]} > 0)) || fail "scontrol show hostnames '$SLURM_JOB_NODELIST' listed no hosts"
  local port=$PORT
  if [[ -z $port ]]; then
    require_int SLURM_JOB_ID "${SLURM_JOB_ID:-}" 0
    port=$((61440 + 10#$SLURM_JOB_ID % 4096))
  fi
  local options
  mapfile -t options < <(forwarded_options)
  run srun --kill-on-bad-exit=1 "--output=$LOG_DIR/%x-%j-task%t.out" "$HERE/slurm.sh" --stage=task \
    "--coordinator=${hosts[0]}:$port" "${options[@]}" -- "${EXTRA_ARGS[@]}"
}

task() {
  require_value --coordinator "$COORDINATOR"
  require_int SLURM_PROCID "${SLURM_PROCID:-}" 0
  require_int SLURM_NTASKS "${SLURM_NTASKS:-}" 1
  local command=("$PYTHON" -m mm_jax.main "--config=$CONFIG" "--workdir=$WORKDIR"
    "--coordinator_address=$COORDINATOR" "--num_processes=$SLURM_NTASKS"
    "--process_id=$SLURM_PROCID" "${EXTRA_ARGS[@]}")
  run cd "$REPO"
  if ((DRY_RUN)); then
    run "${command[@]}"
  else
    exec "${command[@]}"
  fi
}

"$STAGE"
