"""Orbax checkpoints of the train state and the data iterator's position, saved together.

A step directory is only visible to `all_steps()` once orbax has finished writing it (it writes to
a temporary name and renames), so a kill mid-save never replaces the last good checkpoint. A
checkpoint that exists but cannot be read (truncated file, disk fault) is skipped with a warning
and the previous one is restored instead.
"""

import os

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Saves {state, data} every call to `save`; restores the newest readable step."""

  def __init__(self, directory: str, keep: int, async_save: bool = True):
    # Local paths are made absolute; bucket paths (gs://...) go to orbax as they are.
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save
      ),
      item_names=("state", "data"),
    )

  def save(self, step: int, state, data_state, force: bool = False) -> bool:
    return self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
      ),
      force=force,
    )

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state):
    """Returns (step, state, data_state) from the newest readable checkpoint, or None."""
    for step in reversed(self.steps()):
      try:
        restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
          ),
        )
      except Exception as error:  # noqa: BLE001 - any unreadable checkpoint falls back
        logging.warning(
          "checkpoint at step %d in %s is unreadable (%s: %s); trying the previous one",
          step,
          self.directory,
          type(error).__name__,
          str(error).splitlines()[0] if str(error) else "",
        )
        continue
      return step, restored["state"], restored["data"]
    return None

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying shardings: restore targets placed straight onto the mesh."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings
  )
