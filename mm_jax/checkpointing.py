"""Orbax checkpoints of the train state and the data iterator's position, saved together.

A step directory is only visible to `all_steps()` once orbax has finished writing it (it writes to
a temporary name and renames), so a kill mid-save never replaces the last good checkpoint. A
checkpoint that exists but cannot be read (truncated file, disk fault) is skipped with a warning
and the previous one is restored instead; when none can be read, the run stops with a one-line
`CheckpointReadError` rather than start afresh beside them (keep-N would then delete them). A
readable checkpoint whose state has other leaves or shapes than the config's (another model or
optimizer) is a `ConfigError`, raised before anything is restored or compiled: falling back past
it would start afresh in its directory, where new saves skip its step numbers and keep-N later
deletes its steps. A save that fails (full disk, lost permissions) ends the run with a one-line
`CheckpointWriteError` instead of a traceback from orbax's threads.

The data iterator's position differs per process (its own shard and counters) while orbax writes
JSON from process 0 only, so every process's position is gathered and saved as one list.

A directory that cannot be created is reported before orbax starts its save: when orbax's own
step-directory creation fails, its other save threads wait for a signal that never comes (300 s,
then tracebacks) and keep the process from exiting.
"""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint._src.metadata import array_metadata_store

from mm_jax.errors import ConfigError

# Orbax writes a replicated array "replica-parallel": each replica writes a slice of it, cut on
# the device by an eager slice that compiles a program of its own per shape and device (a few
# hundred for the tiny model on 8 devices: seconds at a process's first save, and every save
# dispatches them). Below this many bytes per slice, one replica writes the whole array.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _use_array_handler():
  """orbax's default jax.Array handler (same metadata store), replica-parallel only for big
  slices; registered globally, as orbax's StandardSave takes no handler of its own."""
  ocp.type_handlers.register_type_handler(
    jax.Array,
    ocp.type_handlers.ArrayHandler(
      array_metadata_store=array_metadata_store.Store(),
      min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
    ),
    override=True,
  )


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or read; the message is one line naming the directory."""


class CheckpointWriteError(CheckpointError):
  """A checkpoint could not be written (full disk, lost permissions)."""


class CheckpointReadError(CheckpointError):
  """Checkpoints exist but none could be read: starting afresh beside them would let keep-N
  delete them, so the run stops instead."""


def _one_line(error: BaseException, limit: int = 200) -> str:
  text = str(error).splitlines()[0] if str(error) else ""
  text = text if len(text) <= limit else text[:limit] + "..."
  return f"{type(error).__name__}: {text}"


def _gather_per_process(data_state) -> list:
  """Every process's JSON-able state, in process order (a one-entry list on one process)."""
  if jax.process_count() == 1:
    return [data_state]
  blob = np.frombuffer(json.dumps(data_state).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([blob.size], np.int32))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[: blob.size] = blob
  blobs = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(b[: int(n)]).decode()) for b, n in zip(blobs, lengths.ravel())]


def leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
  """Each leaf's shape by its path as orbax names it ("opt_state.1.0.mu.encoder.ffn.w_in"); the
  same for a state, its abstract shapes and a checkpoint's array metadata."""
  return {
    jax.tree_util.keystr(path, simple=True, separator="."): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def shape_difference(stored: dict, wanted: dict) -> str | None:
  """The first way a checkpoint's leaf shapes differ from the wanted ones, in words (or None);
  parameters first, as their names say most about the model."""
  for name in sorted(stored.keys() | wanted.keys(), key=lambda n: (not n.startswith("params."), n)):
    if name not in wanted:
      return f"it has {name}, which this config's state lacks"
    if name not in stored:
      return f"it lacks {name}"
    if stored[name] != wanted[name]:
      return f"{name} has shape {stored[name]}, this config's {wanted[name]}"
  return None


def _own_state(saved, step: int):
  if "per_process" not in saved:  # written before positions were kept per process
    return saved
  per_process = saved["per_process"]
  if len(per_process) != jax.process_count():
    raise ConfigError(
      f"checkpoint step {step} holds data positions of {len(per_process)} processes but "
      f"{jax.process_count()} are running: resume with the same process count"
    )
  return per_process[jax.process_index()]


class Checkpointer:
  """Saves {state, data} every call to `save`; restores the newest readable step."""

  def __init__(self, directory: str, keep: int, async_save: bool = True):
    # Local paths are made absolute; bucket paths (gs://...) go to orbax as they are.
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self._last_saved = None
    self._stored = {}  # step -> its leaf shapes (or None): a written step never changes
    _use_array_handler()
    self.manager = ocp.CheckpointManager(
      self.directory,
      # Not created here but by the first save (_check_writable): a run that stops before it,
      # on a bad config or missing data, leaves no checkpoint directory behind.
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=False, enable_async_checkpointing=async_save
      ),
      # Handlers, not only item names: item_metadata can then read a step's shapes.
      item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
    )

  def save(self, step: int, state, data_state, force: bool = False) -> bool:
    if step == self._last_saved:
      return False  # e.g. SIGTERM right after a scheduled save of the same step
    data = {"per_process": _gather_per_process(data_state)}
    self._last_saved = step  # an async save's failure surfaces later, in wait()
    try:
      _check_writable(self.directory)
      return self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)),
        force=force,
      )
    except Exception as error:  # noqa: BLE001 - any failure to write ends the run the same way
      raise self._write_error(step, error) from None

  def _write_error(self, step, error) -> CheckpointWriteError:
    return CheckpointWriteError(
      f"cannot write the step {step} checkpoint to {self.directory} ({_one_line(error)}): "
      "free disk space or fix permissions, then rerun to resume from the last checkpoint"
    )

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def _stored_shapes(self, step: int) -> dict | None:
    """The step's state leaf shapes from its metadata, or None where that cannot be read. Read
    once per step: train.py checks before compiling, restore_latest again."""
    if step not in self._stored:
      try:
        self._stored[step] = leaf_shapes(self.manager.item_metadata(step)["state"])
      except Exception as error:  # noqa: BLE001 - unreadable: restore_latest falls back past it
        logging.warning("checkpoint at step %d: no readable metadata (%s)", step, _one_line(error))
        self._stored[step] = None
    return self._stored[step]

  def check_matches(self, abstract_state):
    """Raises ConfigError if the newest checkpoint with readable metadata holds a state of other
    leaves or shapes than `abstract_state` (cheap: no array is read). Call it before compiling."""
    wanted = leaf_shapes(abstract_state)
    for step in reversed(self.steps()):
      stored = self._stored_shapes(step)
      if stored is None:
        continue
      difference = shape_difference(stored, wanted)
      if difference is not None:
        raise ConfigError(
          f"{self.directory} holds step {step} of another model or optimizer ({difference}): "
          "resume with the config that wrote it, or give this config its own --workdir"
        )
      return

  def newest_data_state(self):
    """This process's data position in the newest checkpoint (its JSON alone, no array is read),
    or None: no checkpoint, or one that cannot be read (restore_latest falls back past it)."""
    steps = self.steps()
    if not steps:
      return None
    try:
      saved = self.manager.restore(steps[-1], args=ocp.args.Composite(data=ocp.args.JsonRestore()))
    except Exception:  # noqa: BLE001 - unreadable: restore_latest warns and falls back
      return None
    return _own_state(saved["data"], steps[-1])

  def restore_latest(self, abstract_state):
    """Returns (step, state, data_state) from the newest readable checkpoint; None when there is
    no checkpoint, CheckpointReadError when there are some and none reads.

    With `abstract_state` (not None), a checkpoint of other shapes is a ConfigError
    (check_matches), not an unreadable one to fall back past."""
    if abstract_state is not None:
      self.check_matches(abstract_state)
    steps = self.steps()
    for step in reversed(steps):
      try:
        restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
          ),
        )
      except Exception as error:  # noqa: BLE001 - any unreadable checkpoint falls back
        logging.warning(
          "checkpoint at step %d in %s is unreadable (%s); trying the previous one",
          step,
          self.directory,
          _one_line(error),
        )
        last_error = error
        continue
      return step, restored["state"], _own_state(restored["data"], step)
    if steps:
      raise CheckpointReadError(
        f"none of the {len(steps)} checkpoints in {self.directory} (steps {steps[0]}-{steps[-1]}) "
        f"can be read (oldest: {_one_line(last_error)}): restore access to them or a good copy, "
        "or move them away to start afresh"
      )
    return None

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except Exception as error:  # noqa: BLE001 - an async save failed in the background
      raise self._write_error(self._last_saved, error) from None

  def close(self):
    """Waits for pending saves, then stops orbax's threads (also when a save failed)."""
    try:
      self.wait()
    finally:
      self.manager.close()

  def __enter__(self):
    return self

  def __exit__(self, error_type, error, traceback):
    try:
      self.close()
    except CheckpointWriteError as write_error:
      if error_type is None:
        raise
      # The run is already failing: the pending save was let finish; keep the original error.
      logging.error("%s", write_error)


def _check_writable(directory: str):
  """Raises OSError if `directory` cannot hold a new step directory (it is a file, or read-only)."""
  path = epath.Path(directory)
  path.mkdir(parents=True, exist_ok=True)
  if "://" not in directory and not os.access(directory, os.W_OK | os.X_OK):
    raise PermissionError(f"no write permission on {directory}")


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying shardings: restore targets placed straight onto the mesh."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings
  )
