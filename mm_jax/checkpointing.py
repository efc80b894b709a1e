"""Orbax checkpoints of the train state and the data iterator's position, saved together.

A step directory is only visible to `all_steps()` once orbax has finished writing it (it writes to
a temporary name and renames), so a kill mid-save never replaces the last good checkpoint.

Every step carries the checksums of its arrays (`checksums`, a third item of the step, committed
by orbax with the others): a CRC32 of each array's host bytes, per shard its process owns when
the array spans processes. A restore verifies them. A step that cannot be read (truncated file,
missing metadata, disk fault) or whose arrays differ from their checksums (flipped bits) is
reported in one line and the previous step is restored instead; the damaged step is then moved
aside, renamed to `corrupt/STEP-TIME` (never deleted), so that the run writes that step again
when it reaches it. When no step can be restored, none is moved and the run stops with a one-line
`CheckpointReadError` rather than start afresh beside them (keep-N would then delete them).

A checkpoint whose own metadata reads and gives other leaves or shapes than the config's (another
model or optimizer) is a `ConfigError`, raised before anything is restored or compiled: falling
back past it would start afresh in its directory, where new saves skip its step numbers and keep-N
later deletes its steps. Metadata that cannot be read is damage, not another model.

A save that fails (full disk, lost permissions) ends the run with a one-line
`CheckpointWriteError`; orbax's own error records and tracebacks stay in the log (main.py keeps
them off the console), and the reads a failed restore leaves pending end without printing.

The data iterator's position differs per process (its own shard and counters) while orbax writes
JSON from process 0 only, so every process's position is gathered and saved as one list.

A directory that cannot be created is reported before orbax starts its save: when orbax's own
step-directory creation fails, its other save threads wait for a signal that never comes (300 s,
then tracebacks) and keep the process from exiting.
"""

import json
import logging as std_logging
import os
import sys
import time
import zlib

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


# The step item holding the arrays' checksums, and how they are computed.
CHECKSUMS = "checksums"
CHECKSUM_ALGORITHM = "crc32"
# Damaged steps are moved under this folder of the checkpoint directory (orbax ignores it: its
# name is no step number).
CORRUPT_DIR = "corrupt"


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


def _index_key(index, shape) -> str:
  """A shard's place in its array, e.g. "0:4,0:32" (the whole array of shape (4, 32))."""
  return ",".join(
    f"{s.start or 0}:{dim if s.stop is None else s.stop}" for s, dim in zip(index, shape)
  )


def _digest(host: np.ndarray) -> str:
  return f"{zlib.crc32(memoryview(np.ascontiguousarray(host)).cast('B')) & 0xFFFFFFFF:08x}"


def _whole(shape) -> tuple:
  return tuple(slice(0, dim) for dim in shape)


def checksums(state) -> dict[str, dict[str, str]]:
  """{leaf name: {shard index key: CRC32 of its host bytes}} of what this process owns: every
  array it holds whole (all of them on one process), else its shards of replica 0."""
  sums = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    name = jax.tree_util.keystr(path, simple=True, separator=".")
    shape = np.shape(leaf)
    if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
      sums[name] = {_index_key(_whole(shape), shape): _digest(np.asarray(leaf))}
      continue
    sums[name] = {
      _index_key(shard.index, shape): _digest(np.asarray(shard.data))
      for shard in leaf.addressable_shards
      if shard.replica_id == 0
    }
  return sums


def _merge(per_process: list[dict]) -> dict:
  merged = {}
  for sums in per_process:
    for name, shards in sums.items():
      merged.setdefault(name, {}).update(shards)
  return merged


def checksum_mismatch(state, saved: dict) -> str | None:
  """The first leaf of `state` whose bytes differ from the saved checksums, in words (or None).
  Whole arrays are checked against any saved shard (its slice of the host copy); shards of an
  array spread over processes against the saved shard at the same place."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    name = jax.tree_util.keystr(path, simple=True, separator=".")
    if name not in saved:
      return f"{name} has no checksum"
    shape = np.shape(leaf)
    if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
      host = np.asarray(leaf)
      pieces = [(key, host[_slices(key)]) for key in saved[name]]
    else:
      pieces = []
      for shard in leaf.addressable_shards:
        key = _index_key(shard.index, shape)
        if key in saved[name]:
          pieces.append((key, np.asarray(shard.data)))
    for key, host in pieces:
      if _digest(host) != saved[name][key]:
        return f"{name}[{key}] differs from its checksum"
  return None


def _slices(key: str) -> tuple:
  return tuple(slice(*map(int, part.split(":"))) for part in key.split(",") if part)


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


class ChecksumError(CheckpointError):
  """A restored array's bytes differ from the checksum saved with them."""


class _QuietPendingReads:
  """Keeps what a failed restore leaves behind off the console: orbax restores in an event loop
  it closes when the first read fails, and each of the other reads, finishing later, reports
  "Event loop is closed" (as an unraisable exception, or through the asyncio and
  concurrent.futures loggers). The failed restore itself is reported in one line."""

  installed = False

  @staticmethod
  def _is_noise(error) -> bool:
    return isinstance(error, RuntimeError) and "Event loop is closed" in str(error)

  @classmethod
  def install(cls):
    if cls.installed:
      return
    cls.installed = True
    previous = sys.unraisablehook

    def hook(unraisable):
      code = getattr(unraisable.object, "cr_code", None)
      orphaned_read = code is not None and "orbax" in code.co_filename
      if not (cls._is_noise(unraisable.exc_value) or orphaned_read):
        previous(unraisable)

    sys.unraisablehook = hook
    for name in ("asyncio", "concurrent.futures"):
      std_logging.getLogger(name).addFilter(
        lambda record: not (record.exc_info and cls._is_noise(record.exc_info[1]))
      )


def _on_any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


class CheckpointMismatch(ConfigError):
  """The config builds other leaves or shapes than the checkpoint holds. `difference` says which,
  for commands whose fix is another (predict: drop --config)."""

  def __init__(self, message: str, difference: str):
    super().__init__(message)
    self.difference = difference


class Checkpointer:
  """Saves {state, data, checksums} every call to `save`; restores the newest step whose arrays
  read back and match their checksums."""

  def __init__(self, directory: str, keep: int, async_save: bool = True):
    # Local paths are made absolute; bucket paths (gs://...) go to orbax as they are.
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self._last_saved = None
    self._stored = {}  # step -> its leaf shapes (or None): a written step never changes
    _use_array_handler()
    _QuietPendingReads.install()
    self.manager = ocp.CheckpointManager(
      self.directory,
      # Not created here but by the first save (_check_writable): a run that stops before it,
      # on a bad config or missing data, leaves no checkpoint directory behind.
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=False, enable_async_checkpointing=async_save
      ),
      # Handlers, not only item names: item_metadata can then read a step's shapes.
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        CHECKSUMS: ocp.JsonCheckpointHandler(),
      },
    )

  def save(self, step: int, state, data_state, force: bool = False) -> bool:
    """Starts saving `step` (False: that step is already saved). The checksums are taken here,
    from the arrays as they are now; orbax commits them with the step."""
    if step == self._last_saved or step in self.manager.all_steps():
      return False  # e.g. SIGTERM right after a scheduled save, or before any step was taken
    data = {"per_process": _gather_per_process(data_state)}
    sums = {
      "algorithm": CHECKSUM_ALGORITHM,
      "leaves": _merge(_gather_per_process(checksums(state))),
    }
    self._last_saved = step  # an async save's failure surfaces later, in wait()
    try:
      _check_writable(self.directory)
      return self.manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data),
          **{CHECKSUMS: ocp.args.JsonSave(sums)},
        ),
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
    """The step's state leaf shapes from its metadata, or None where that cannot be read (a
    missing or damaged metadata file reads as no leaves at all). Read once per step: train.py
    checks before compiling, restore_latest again."""
    if step not in self._stored:
      try:
        self._stored[step] = leaf_shapes(self.manager.item_metadata(step)["state"]) or None
      except Exception as error:  # noqa: BLE001 - unreadable: restore_latest falls back past it
        logging.warning("checkpoint at step %d: no readable metadata (%s)", step, _one_line(error))
        self._stored[step] = None
    return self._stored[step]

  def check_matches(self, abstract_state):
    """Raises ConfigError if the newest checkpoint with readable metadata holds a state of other
    leaves or shapes than `abstract_state` (cheap: no array is read). Call it before compiling.
    A step whose metadata cannot be read is passed over: that is damage, which restore_latest
    handles, not proof of another model."""
    wanted = leaf_shapes(abstract_state)
    for step in reversed(self.steps()):
      stored = self._stored_shapes(step)
      if stored is None:
        continue
      difference = shape_difference(stored, wanted)
      if difference is not None:
        raise CheckpointMismatch(
          f"{self.directory} holds step {step} of another model or optimizer ({difference}): "
          "resume with the config that wrote it, or give this config its own --workdir",
          difference,
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

  def _restore_verified(self, step: int, abstract_state, with_data: bool) -> dict:
    """The step's items, its state checked against its checksums (ChecksumError if it differs
    on any process)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if with_data:
      items["data"] = ocp.args.JsonRestore()
    has_checksums = (epath.Path(self.directory) / str(step) / CHECKSUMS).exists()
    if has_checksums:
      items[CHECKSUMS] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if not has_checksums:
      logging.warning(
        "checkpoint at step %d in %s carries no checksums (saved before mm_jax kept them): "
        "restored unverified",
        step,
        self.directory,
      )
      return restored
    problem = checksum_mismatch(restored["state"], restored[CHECKSUMS]["leaves"])
    if _on_any_process(problem is not None):
      raise ChecksumError(problem or "another process's shards differ from their checksums")
    return restored

  def restore_latest(self, abstract_state, move_aside: bool = True, with_data: bool = True):
    """Returns (step, state, data_state) from the newest checkpoint that reads back and matches
    its checksums; None when there is no checkpoint, CheckpointReadError when there are some and
    none does (then nothing is moved).

    Each newer, damaged step gets one warning line; with `move_aside` it is renamed to
    corrupt/STEP-TIME, so that the run writes that step again. With `abstract_state` (not
    None), a checkpoint of other shapes is a ConfigError (check_matches), not a damaged one to
    fall back past. Without `with_data`, data_state is None (inference needs no position)."""
    if abstract_state is not None:
      self.check_matches(abstract_state)
    steps = self.steps()
    damaged = []
    for step in reversed(steps):
      try:
        restored = self._restore_verified(step, abstract_state, with_data)
      except ConfigError:
        raise
      except Exception as error:  # noqa: BLE001 - any damaged checkpoint falls back
        damaged.append((step, error))
        continue
      for bad, error in damaged:
        where = f"moved to {self._move_aside(bad)}, to be written again" if move_aside else "kept"
        logging.warning(
          "checkpoint at step %d in %s is damaged (%s): restored step %d instead; %s",
          bad,
          self.directory,
          _one_line(error),
          step,
          where,
        )
      data_state = _own_state(restored["data"], step) if with_data else None
      return step, restored["state"], data_state
    if steps:
      raise CheckpointReadError(
        f"none of the {len(steps)} checkpoints in {self.directory} (steps {steps[0]}-{steps[-1]}) "
        f"can be read intact (oldest: {_one_line(damaged[-1][1])}): restore access to them or "
        "a good copy, or move them away to start afresh"
      )
    return None

  def _move_aside(self, step: int) -> str:
    """Renames the step's directory to corrupt/STEP-TIME (process 0; all wait for it)."""
    root = epath.Path(self.directory)
    target = root / CORRUPT_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      suffix = 1
      while target.exists():
        suffix += 1
        target = root / CORRUPT_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
      (root / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"mm_jax_move_aside_{step}")
    self._stored.pop(step, None)
    self.manager.reload()
    return str(target)

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
