"""Entry point: `python -m mm_jax.main --config=configs/multimodel.py --workdir=DIR`.

Any `--config.field=value` overrides a config field. A bad config ends the run before anything is
compiled, with one line on stderr naming the field and the fix, and exit status 2 (a bad flag
too). Other exits: 3 after too many non-finite steps in a row, 4 when a checkpoint cannot be
written or none of those there can be read intact, 143 after SIGTERM (a checkpoint of the
current step was saved first, when the training loop was running).

SIGTERM is honoured from the moment this module is imported: it is blocked (kept pending, also
across memory.py's re-execution) until the handler that records it is installed. The training
loop's own handler (train._TerminationFlag) takes a recorded signal over and saves; a signal the
loop never saw ends the process with 143 and one line.
"""

import os
import signal
import sys

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

from mm_jax import backend, cli, memory  # noqa: E402


class _Sigterm:
  """SIGTERM's handler until the training loop installs its own: records the signal. Its
  `received` is what the loop's handler reads when it takes over."""

  received = False

  def __call__(self, signum, frame):
    del signum, frame
    _Sigterm.received = True


backend.use_cpu_alone_without_accelerators()  # before JAX is imported (see backend.py)
if backend.cpu_only():  # the allocator tuning is for XLA:CPU's buffers
  memory.restart_with_tuned_malloc()  # it re-executes the process (see memory.py)
signal.signal(signal.SIGTERM, _Sigterm())
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402


def define_flags(values):
  def string(name, default, help_text):
    flags.DEFINE_string(name, default, help_text, flag_values=values)

  config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/multimodel.py.", flag_values=values
  )
  flags.mark_flag_as_required("config", flag_values=values)
  string("workdir", "workdir", "Checkpoints, TensorBoard logs, results.")
  string(
    "coordinator_address", None, "host:port of process 0 for jax.distributed (GPU clusters, tests)."
  )
  string(
    "compilation_cache",
    "~/.cache/mm_jax/xla",
    "Persistent XLA compilation cache: a rerun or resume skips compiling ('' turns it off; "
    "$JAX_COMPILATION_CACHE_DIR wins when set).",
  )
  flags.DEFINE_integer(
    "num_processes", None, "Processes in a multi-process run.", flag_values=values
  )
  flags.DEFINE_integer("process_id", None, "This process's index.", flag_values=values)
  flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() (auto-detected on Cloud TPU).",
    flag_values=values,
  )


def process_flags_error(values) -> str | None:
  """What is wrong with the multi-process flags, or None. jax.distributed would raise a
  ValueError traceback, or wait for a coordinator that never comes."""
  count, index = values.num_processes, values.process_id
  if count is not None and count < 1:
    return f"--num_processes={count}: use 1 or more"
  if index is not None and index < 0:
    return f"--process_id={index}: use 0 or more"
  if count is not None and index is not None and index >= count:
    return f"--process_id={index} with --num_processes={count}: use a process id below {count}"
  if (count is not None or index is not None) and not (
    values.coordinator_address or values.distributed
  ):
    return (
      "--num_processes and --process_id take effect only with --coordinator_address=host:port "
      "(or --distributed): add it, or drop them for a one-process run"
    )
  return None


class _LibraryInfoFilter:
  """Keeps INFO lines from our code; libraries' INFO chatter is dropped, and so are the warnings
  every run gets that say nothing about this run (a dataset folder being built, a deprecated
  TFDS field read inside TFDS, orbax registering its array handler). Orbax's own reports of a
  failed save or restore (tracebacks from its threads, one per pending operation) are dropped
  too: mm_jax/checkpointing.py reports each failure in one line."""

  _NOISY = ("tensorflow_datasets", "orbax", "etils", "jax/_src", "clu/")
  _ROUTINE_WARNINGS = (
    "has no dataset_info.json",
    "`FeatureConnector.dtype` is deprecated",
    "Type handler registry type",
  )
  _REPORTED_BY_CHECKPOINTING = ("but could not be restored",)

  def filter(self, record):
    if "orbax" in record.pathname and (
      record.exc_info
      or record.levelno >= 40
      or any(part in str(record.msg) for part in self._REPORTED_BY_CHECKPOINTING)
    ):
      return False
    if record.levelno >= 30:  # warnings and errors pass, unless routine
      message = record.getMessage()
      return not any(part in message for part in self._ROUTINE_WARNINGS)
    return not any(part in record.pathname for part in self._NOISY)


def _quiet_library_logs():
  """On the handlers, not a logger: libraries log through loggers of their own (or the root),
  whose records reach absl's handler without passing another logger's filters."""
  import logging as std_logging

  library_filter = _LibraryInfoFilter()
  for handler in std_logging.getLogger().handlers:
    handler.addFilter(library_filter)


def _exit_if_terminated(when: str):
  """Exit 143 with one line if SIGTERM arrived while no training loop was there to save."""
  if _Sigterm.received:
    print(f"preempted: SIGTERM {when}: nothing to save", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(143)


def _flag_error(message: str):
  print(f"flag error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def main(argv, values=None):
  values = values or flags.FLAGS
  if len(argv) > 1:
    _flag_error(f"unexpected arguments {argv[1:]}: pass --flag=value only")
  if not values.workdir.strip():
    _flag_error("--workdir is empty: name the run's directory")
  process_error = process_flags_error(values)
  if process_error:
    _flag_error(process_error)
  _exit_if_terminated("during start-up")
  try:
    config = values.config
    config.get  # noqa: B018 - a config file that failed to load raises only when read
  except Exception as error:  # noqa: BLE001 - whatever loading the file raised
    _flag_error(f"--config: {cli.one_line(error)}")
  _quiet_library_logs()
  import jax

  cache = values.compilation_cache
  if cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
  if values.distributed or values.coordinator_address:
    jax.distributed.initialize(
      coordinator_address=values.coordinator_address,
      num_processes=values.num_processes,
      process_id=values.process_id,
    )
  from mm_jax import train
  from mm_jax.checkpointing import CheckpointError
  from mm_jax.errors import ConfigError

  logging.info(
    "devices: %d (%s), processes: %d",
    jax.device_count(),
    jax.devices()[0].platform,
    jax.process_count(),
  )
  _exit_if_terminated("during start-up")
  try:
    train.train_and_evaluate(config, values.workdir)
  except ConfigError as error:
    print(f"config error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)
  except train.Preempted as stop:
    # Non-zero so that launchers (launch/tpu_pod.sh) rerun the job, which then resumes.
    print(f"preempted: {stop}", file=sys.stderr, flush=True)
    # The checkpoint is complete (Checkpointer.close waited for it). Leave at once: an orderly
    # interpreter shutdown was seen to hang on input-pipeline threads after SIGTERM, and a
    # preempted VM gives us little time.
    sys.stdout.flush()
    os._exit(143)
  except train.NonFiniteError as error:
    print(f"stopped: {error}", file=sys.stderr, flush=True)
    sys.exit(3)
  except CheckpointError as error:  # cannot write one, or none of those there reads
    print(f"checkpoint error: {error}", file=sys.stderr, flush=True)
    sys.exit(4)
  # The loop ended (or never ran: a finished run only evaluates) with a SIGTERM it did not see.
  _exit_if_terminated("outside the training loop")


if __name__ == "__main__":
  cli.start(define_flags, main)
