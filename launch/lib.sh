# Helpers shared by the launch scripts: one-line errors, argument checks, and the --dry-run switch
# that turns every side effect into a printed, copy-pasteable command. Sourced, never executed.
# shellcheck shell=bash

DRY_RUN=0

# Bad usage: one line on stderr, exit status 2.
die() {
  printf '%s: %s\n' "${0##*/}" "$*" >&2
  exit 2
}

# A failure while running (a job or a cloud call went wrong): exit status 1.
fail() {
  printf '%s: %s\n' "${0##*/}" "$*" >&2
  exit 1
}

# Progress notes go to stderr so stdout stays the list of commands under --dry-run.
note() {
  printf '%s: %s\n' "${0##*/}" "$*" >&2
}

# Quotes one word for a POSIX shell, leaving plain words bare so printed commands stay readable.
quote_word() {
  local word=$1
  if [[ -n $word && $word =~ ^[A-Za-z0-9_./:=,+@%^-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# The words as one shell command line.
quote_command() {
  local out="" word
  for word in "$@"; do
    out+="$(quote_word "$word") "
  done
  printf '%s' "${out% }"
}

# Runs a command, or under --dry-run prints it (one line) and pretends it succeeded.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote_command "$@")"
  else
    "$@"
  fi
}

# Under --dry-run, a comment explaining what the printed plan assumes; otherwise a note.
explain() {
  if ((DRY_RUN)); then
    printf '# %s\n' "$*"
  else
    note "$*"
  fi
}

require_value() {
  local flag=$1 value=$2
  [[ -n $value ]] || die "$flag is required (see --help)"
}

# Decimal digits without a leading zero: bash arithmetic reads "09" as octal (and fails) or "010"
# as 8, so such a value is refused rather than read differently from how it was written.
require_int() {
  local flag=$1 value=$2 min=$3
  if ! [[ $value =~ ^(0|[1-9][0-9]*)$ ]] || ((value < min)); then
    die "$flag must be an integer >= $min without leading zeros, got '$value'"
  fi
}

require_choice() {
  local flag=$1 value=$2
  shift 2
  local choice
  for choice in "$@"; do
    [[ $value == "$choice" ]] && return 0
  done
  die "$flag must be one of: $*; got '$value'"
}

# An absolute path for a local path (left alone for gs:// and other URLs), resolved against $PWD.
absolute_path() {
  case $1 in
    /* | *://*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$PWD" "${1#./}" ;;
  esac
}

# Parses `--flag=value`, `--flag value`, switches and `-- args for mm_jax.main` (kept in EXTRA_ARGS).
# The sourcing script defines `set_switch FLAG` and `set_option FLAG VALUE`; each returns 1 for a
# flag it does not know, so every unknown flag gets the same one-line error.
EXTRA_ARGS=()
parse_args() {
  while (($#)); do
    case $1 in
      --)
        shift
        # shellcheck disable=SC2034  # read by the sourcing script
        EXTRA_ARGS=("$@")
        return 0
        ;;
      -h | --help)
        usage
        exit 0
        ;;
      --dry-run) DRY_RUN=1 ;;
      --*=*) set_option "${1%%=*}" "${1#*=}" || die "unknown flag ${1%%=*} (see --help)" ;;
      --*)
        if ! set_switch "$1"; then
          (($# >= 2)) || die "$1 needs a value, or is unknown (see --help)"
          set_option "$1" "$2" || die "unknown flag $1 (see --help)"
          shift
        fi
        ;;
      *) die "unexpected argument '$1': flags for mm_jax.main go after --" ;;
    esac
    shift
  done
}
