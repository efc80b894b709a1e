#!/usr/bin/env bash
# Trains mm_jax on a Cloud TPU pod slice and keeps it training through preemptions: create or reuse
# the TPU VM, put the code on every worker, run the trainer on all workers at once, and when the
# slice is preempted recreate it and rerun the same command. The trainer itself resumes from the
# newest checkpoint in the gs:// workdir, so this loop only has to bring the machines back.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
# shellcheck source=launch/lib.sh
source "$HERE/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name=NAME --zone=ZONE --workdir=gs://BUCKET/PATH [options]
                         [-- flags for mm_jax.main]

Creates (or reuses) the Cloud TPU VM slice NAME, copies the files git tracks in this checkout
(their working-tree contents; untracked and ignored files stay here) to ~/mm_jax-launch/code on
every worker and installs it with the tpu extra (or pip-installs --pip-spec), then runs
  cd ~/mm_jax-launch/code && python3 -m mm_jax.main --config=CONFIG --workdir=WORKDIR --distributed [flags]
on all workers (gcloud ... ssh --worker=all), streaming their output here and into
LOG_DIR/attempt-N.log. If the run ends while the VM is not READY (PREEMPTED, TERMINATED, ...), or the
ssh connection dropped (exit 255), the VM is recreated (or waited for) and the same command rerun,
up to --max-restarts times; the trainer resumes from the newest checkpoint in WORKDIR.
A run that fails on a healthy VM (a config error, a crash) is not retried unless --retry-on=any.

Needs: gcloud authenticated for the project, and your key loaded for multi-worker ssh
(ssh-add ~/.ssh/google_compute_engine).

Options (--flag=value or --flag value):
  --name=NAME                TPU VM name (required; lowercase letters, digits, hyphens)
  --zone=ZONE                zone, e.g. us-east5-a (required)
  --project=PROJECT          project (default: gcloud's configured project)
  --accelerator-type=TYPE    slice type, e.g. v5p-64, v5litepod-16, v6e-8, v4-32 (default v5p-64)
  --version=RUNTIME          TPU software version (default from the type: v5p v2-alpha-tpuv5,
                             v5e/v5litepod v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e,
                             v2/v3/v4 tpu-ubuntu2204-base)
  --spot                     create a Spot VM (cheaper, preemptible at any time)
  --preemptible              create a preemptible VM (legacy; at most 24 hours)
  --workdir=gs://B/PATH      checkpoints and TensorBoard logs (required; must be gs:// so that every
                             worker shares it and it outlives a preempted VM)
  --config=PATH[:VARIANT]    config file, relative to the repo (default configs/multimodel.py:paper)
  --pip-spec=SPEC            pip-install SPEC on the workers instead of this working tree, e.g.
                             'mm_jax[tpu] @ git+https://github.com/OWNER/mm_jax@v0.1.0'
                             (configs/ is still copied so that --config resolves)
  --skip-setup               the workers already have ~/mm_jax-launch/code installed: copy and
                             install nothing
                             (a recreated VM is still set up)
  --log-dir=DIR              local logs, attempt-N.log (default workdir/tpu-logs/NAME)
  --max-restarts=N           give up after N restarts (default 50)
  --poll-seconds=S           wait between state checks of a VM that is changing state (default 60)
  --retry-on=preemption|any  rerun after preemptions only (default), or after any failure
  --dry-run                  print every command (one per line) and execute nothing; the printed
                             plan assumes the VM is absent, that attempt 1 is preempted, and that
                             attempt 2 succeeds, so it shows the recovery path too
  -h, --help                 this help

Everything after `--` is passed to mm_jax.main on every worker, e.g.
  -- --config.data.data_dir=gs://BUCKET/tensorflow_datasets
EOF
}

NAME=""
ZONE=""
PROJECT=""
ACCELERATOR_TYPE=v5p-64
RUNTIME_VERSION=""
PROVISIONING=""
WORKDIR=""
CONFIG=configs/multimodel.py:paper
PIP_SPEC=""
SKIP_SETUP=0
LOG_DIR=""
MAX_RESTARTS=50
POLL_SECONDS=60
RETRY_ON=preemption

set_switch() {
  case $1 in
    --spot | --preemptible)
      [[ -z $PROVISIONING || $PROVISIONING == "$1" ]] || die "--spot and --preemptible exclude each other"
      PROVISIONING=$1
      ;;
    --skip-setup) SKIP_SETUP=1 ;;
    *) return 1 ;;
  esac
}

set_option() {
  case $1 in
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;;
    --accelerator-type) ACCELERATOR_TYPE=$2 ;;
    --version) RUNTIME_VERSION=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --config) CONFIG=$2 ;;
    --pip-spec) PIP_SPEC=$2 ;;
    --log-dir) LOG_DIR=$2 ;;
    --max-restarts) MAX_RESTARTS=$2 ;;
    --poll-seconds) POLL_SECONDS=$2 ;;
    --retry-on) RETRY_ON=$2 ;;
    *) return 1 ;;
  esac
}

default_runtime_version() {
  case $1 in
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v5e-* | v5litepod-*) printf 'v2-alpha-tpuv5-lite' ;;
    v2-* | v3-* | v4-*) printf 'tpu-ubuntu2204-base' ;;
    *) return 1 ;;
  esac
}

parse_args "$@"
require_value --name "$NAME"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name must be lowercase letters, digits and hyphens, starting with a letter; got '$NAME'"
require_value --zone "$ZONE"
require_value --workdir "$WORKDIR"
[[ $WORKDIR == gs://?* ]] ||
  die "--workdir must be a gs:// bucket path (shared by all workers, survives preemption); got '$WORKDIR'"
[[ $ACCELERATOR_TYPE =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
  die "--accelerator-type must look like v5p-64 or v5litepod-16; got '$ACCELERATOR_TYPE'"
if [[ -z $RUNTIME_VERSION ]]; then
  RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR_TYPE") ||
    die "--version is required for accelerator type '$ACCELERATOR_TYPE' (gcloud compute tpus tpu-vm versions list)"
fi
require_value --config "$CONFIG"
require_int --max-restarts "$MAX_RESTARTS" 0
require_int --poll-seconds "$POLL_SECONDS" 0
require_choice --retry-on "$RETRY_ON" preemption any
LOG_DIR=$(absolute_path "${LOG_DIR:-workdir/tpu-logs/$NAME}")
LOCATION=("--zone=$ZONE")
if [[ -n $PROJECT ]]; then LOCATION+=("--project=$PROJECT"); fi
# The launcher's own folder on the workers: it replaces what is inside it and touches nothing else.
# shellcheck disable=SC2088  # the tilde is for the workers' shell to expand
REMOTE_HOME='~/mm_jax-launch'
REMOTE_DIR="$REMOTE_HOME/code"
# The code's archive here: a private temporary file (mktemp), removed when this script exits.
# Under --dry-run the plan names it by its mktemp template.
TARBALL=""

# Under --dry-run, the states and exit codes the printed plan assumes (see --help).
DRY_STATES=(ABSENT PREEMPTED READY)
DRY_EXIT_CODES=(1 0)

tpu_vm() {
  run gcloud compute tpus tpu-vm "$@" "${LOCATION[@]}"
}

# Sets STATE to the VM's state (READY, PREEMPTED, ...) or ABSENT.
query_state() {
  local describe=(gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" '--format=value(state)')
  if ((DRY_RUN)); then
    run "${describe[@]}"
    STATE=${DRY_STATES[0]}
    DRY_STATES=("${DRY_STATES[@]:1}")
    explain "dry run: assuming the VM is $STATE"
    return 0
  fi
  local output errors
  errors=$(mktemp)
  if output=$("${describe[@]}" 2>"$errors"); then
    STATE=${output:-UNKNOWN}
  elif grep -qiE 'NOT_FOUND|not found' "$errors"; then
    STATE=ABSENT
  else
    local reason
    reason=$(head -n 1 "$errors")
    rm -f "$errors"
    fail "gcloud describe $NAME failed: ${reason:-no message}"
  fi
  rm -f "$errors"
}

create_vm() {
  local create=(create "$NAME" "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION")
  if [[ -n $PROVISIONING ]]; then create+=("$PROVISIONING"); fi
  tpu_vm "${create[@]}"
  STATE=READY
  NEEDS_SETUP=1
}

# Brings the VM to READY from whatever STATE it is in.
ensure_ready() {
  while true; do
    case $STATE in
      READY) return 0 ;;
      ABSENT) create_vm ;;
      PREEMPTED | TERMINATED | HIDDEN)
        tpu_vm delete "$NAME" --quiet
        create_vm
        ;;
      STOPPED)
        tpu_vm start "$NAME"
        STATE=READY
        ;;
      CREATING | STARTING | RESTARTING | REPAIRING | STOPPING | DELETING | HIDING | UNHIDING | UNKNOWN)
        note "VM $NAME is $STATE; checking again in ${POLL_SECONDS}s"
        ((DRY_RUN)) || sleep "$POLL_SECONDS"
        query_state
        ;;
      *) fail "VM $NAME is in state '$STATE', which this script does not handle" ;;
    esac
  done
}

on_all_workers() {
  tpu_vm ssh "$NAME" --worker=all --ssh-flag=-oServerAliveInterval=30 \
    --ssh-flag=-oServerAliveCountMax=6 "--command=$1"
}

# Packs the files git tracks under $@ (paths in the repository) into TARBALL: never untracked or
# ignored files (keys, data, workdirs). A tracked file deleted from the working tree is left out.
pack_tracked() {
  local list=(git -C "$REPO" ls-files -z -- "$@")
  local pack=(tar -C "$REPO" --null --ignore-failed-read -T - -czf "$TARBALL")
  if ((DRY_RUN)); then
    printf '%s | %s\n' "$(quote_command "${list[@]}")" "$(quote_command "${pack[@]}")"
    return 0
  fi
  git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
    fail "$REPO is not a git checkout: only the files git tracks are sent (use --pip-spec)"
  "${list[@]}" | "${pack[@]}" 2>/dev/null ||
    fail "could not pack the tracked files of $REPO into $TARBALL"
}

make_tarball() {
  if [[ -n $TARBALL ]]; then return 0; fi
  if ((DRY_RUN)); then
    TARBALL="${TMPDIR:-/tmp}/mm_jax-$NAME.XXXXXX"
    return 0
  fi
  TARBALL=$(mktemp "${TMPDIR:-/tmp}/mm_jax-$NAME.XXXXXX") || fail "mktemp failed"
  trap 'rm -f "$TARBALL"' EXIT
}

setup_workers() {
  local contents=(.) install='python3 -m pip install -q -e ".[tpu]"'
  if [[ -n $PIP_SPEC ]]; then
    contents=(configs)
    install="python3 -m pip install -q $(quote_word "$PIP_SPEC")"
  fi
  make_tarball
  pack_tracked "${contents[@]}"
  # Everything goes inside the launcher's folder: the archive, then the code that replaces the
  # previous copy.
  on_all_workers "mkdir -p $REMOTE_HOME"
  tpu_vm scp "$TARBALL" "$NAME:${REMOTE_HOME#'~/'}/code.tar.gz" --worker=all
  on_all_workers "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf $REMOTE_HOME/code.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && $install"
  NEEDS_SETUP=0
}

# Runs the trainer on every worker, streaming to the terminal and to the attempt's log; returns
# the exit status gcloud reports.
train_on_workers() {
  local log=$1
  local main=(python3 -m mm_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" --distributed
    "${EXTRA_ARGS[@]}")
  local ssh=(gcloud compute tpus tpu-vm ssh "$NAME" --worker=all
    --ssh-flag=-oServerAliveInterval=30 --ssh-flag=-oServerAliveCountMax=6
    "--command=cd $REMOTE_DIR && $(quote_command "${main[@]}")" "${LOCATION[@]}")
  if ((DRY_RUN)); then
    printf '%s 2>&1 | tee -a %s\n' "$(quote_command "${ssh[@]}")" "$(quote_word "$log")"
    local code=${DRY_EXIT_CODES[0]}
    DRY_EXIT_CODES=("${DRY_EXIT_CODES[@]:1}")
    explain "dry run: assuming this run exits with status $code"
    return "$code"
  fi
  "${ssh[@]}" 2>&1 | tee -a "$log"
  return "${PIPESTATUS[0]}"
}

run mkdir -p "$LOG_DIR"
NEEDS_SETUP=$((1 - SKIP_SETUP))
query_state
for ((attempt = 1; ; attempt++)); do
  ensure_ready
  if ((NEEDS_SETUP)); then setup_workers; fi
  explain "attempt $attempt: training on all workers of $NAME"
  status=0
  train_on_workers "$LOG_DIR/attempt-$attempt.log" || status=$?
  query_state
  if ((status == 0)) && [[ $STATE == READY ]]; then
    explain "training finished (attempt $attempt); results in $WORKDIR"
    exit 0
  fi
  if [[ $STATE == READY && $RETRY_ON == preemption && $status != 255 ]]; then
    fail "training failed with exit status $status on a healthy VM (see $LOG_DIR/attempt-$attempt.log); not retrying (use --retry-on=any to retry)"
  fi
  if ((attempt > MAX_RESTARTS)); then
    fail "gave up after $MAX_RESTARTS restarts (last exit status $status, VM $STATE)"
  fi
  explain "attempt $attempt ended with exit status $status while the VM is $STATE: restarting"
done
