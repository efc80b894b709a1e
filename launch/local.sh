#!/usr/bin/env bash
# Runs mm_jax as N cooperating processes on this machine (jax.distributed over localhost, CPU
# devices): the cheapest way to exercise the multi-host code paths before paying for a pod.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
# shellcheck source=launch/lib.sh
source "$HERE/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/local.sh [options] [-- flags for mm_jax.main]

Starts N processes of `python -m mm_jax.main` on this machine, each with K forced CPU devices
(JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=K), joined by
jax.distributed with process 0 as coordinator on localhost:PORT. Each process writes its own log.
Waits for all of them; if one fails, stops the others and exits 1 naming the failed process.

Options (--flag=value or --flag value):
  --num-processes=N          processes to start (default 2)
  --devices-per-process=K    CPU devices per process (default 4)
  --port=PORT                coordinator port on localhost (default 12355)
  --config=PATH[:VARIANT]    config file (default configs/multimodel.py:tiny), relative to the repo
  --workdir=DIR              checkpoints and TensorBoard logs (default workdir/local)
  --log-dir=DIR              one log per process, process-I.log (default WORKDIR/process-logs)
  --python=PATH              Python interpreter (default python3)
  --dry-run                  print every command (one per line) and execute nothing
  -h, --help                 this help

Everything after `--` is passed to every process, e.g. -- --config.train.num_steps=50
Relative paths are resolved against the current directory; the processes run in the repo root.
EOF
}

NUM_PROCESSES=2
DEVICES=4
PORT=12355
CONFIG=configs/multimodel.py:tiny
WORKDIR=workdir/local
LOG_DIR=""
PYTHON=python3

set_switch() { return 1; }

set_option() {
  case $1 in
    --num-processes) NUM_PROCESSES=$2 ;;
    --devices-per-process) DEVICES=$2 ;;
    --port) PORT=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --log-dir) LOG_DIR=$2 ;;
    --python) PYTHON=$2 ;;
    *) return 1 ;;
  esac
}

parse_args "$@"
require_int --num-processes "$NUM_PROCESSES" 1
require_int --devices-per-process "$DEVICES" 1
require_int --port "$PORT" 1
((PORT <= 65535)) || die "--port must be <= 65535, got '$PORT'"
require_value --config "$CONFIG"
require_value --workdir "$WORKDIR"
require_value --python "$PYTHON"
WORKDIR=$(absolute_path "$WORKDIR")
LOG_DIR=$(absolute_path "${LOG_DIR:-$WORKDIR/process-logs}")

# The command for process $1, environment first.
process_command() {
  printf '%s\n' env JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES" \
    "$PYTHON" -m mm_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" \
    "--coordinator_address=localhost:$PORT" "--num_processes=$NUM_PROCESSES" "--process_id=$1" \
    "${EXTRA_ARGS[@]}"
}

if ((DRY_RUN)); then
  run mkdir -p "$LOG_DIR"
  run cd "$REPO"
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    mapfile -t words < <(process_command "$i")
    printf '%s > %s 2>&1 &\n' "$(quote_command "${words[@]}")" "$(quote_word "$LOG_DIR/process-$i.log")"
  done
  printf 'wait\n'
  exit 0
fi

mkdir -p "$LOG_DIR"
cd "$REPO"
PIDS=()
stop_all() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  mapfile -t words < <(process_command "$i")
  "${words[@]}" >"$LOG_DIR/process-$i.log" 2>&1 &
  PIDS+=("$!")
done
note "started $NUM_PROCESSES processes x $DEVICES CPU devices; logs: $LOG_DIR/process-*.log"

# Poll rather than `wait -n`: we must know WHICH process failed, and a failed process leaves the
# others blocked in collectives forever, so they are stopped at once.
remaining=$NUM_PROCESSES
declare -A EXIT_STATUS=()
while ((remaining > 0)); do
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    [[ -n ${EXIT_STATUS[$i]:-} ]] && continue
    pid=${PIDS[$i]}
    kill -0 "$pid" 2>/dev/null && continue
    status=0
    wait "$pid" || status=$?
    EXIT_STATUS[$i]=$status
    remaining=$((remaining - 1))
    if ((status != 0)); then
      stop_all
      wait || true
      tail -n 20 "$LOG_DIR/process-$i.log" >&2 || true
      fail "process $i failed with exit status $status (log: $LOG_DIR/process-$i.log); stopped the others"
    fi
  done
  if ((remaining > 0)); then
    sleep 0.2
  fi
done
note "all $NUM_PROCESSES processes finished; logs: $LOG_DIR"
