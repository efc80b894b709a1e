"""What the config says about the data before any is read: the tasks, each task's batch size and
example shapes, and which saved data positions a run can continue from.

No TensorFlow here. The trainer needs all of this to check the config and to lower its step, and
it does both before TensorFlow's import (about 6 s of Python), which then runs beside the step's
compile (docs/performance.md, "Start-up and the first step").
"""

import hashlib
import json
import os

import numpy as np
from flax.traverse_util import flatten_dict

from mm_jax import sharding
from mm_jax.data import tasks as tasks_lib
from mm_jax.errors import ConfigError

# Sizes of the embedded mixture's build (config.data.embedded_scale): "tiny" for tests.
EMBEDDED_SCALES = ("tiny", "full")
# What happens to text longer than its padded length (config.data.text_overlength).
TEXT_OVERLENGTH = ("truncate", "drop")
# POS tags in linearised parse trees (config.data.parse_pos_tags): as they are, or all "XX".
PARSE_POS_TAGS = ("keep", "xx")


# --- where the data lives (paths only: nothing is read) -----------------------------------------


def data_root(config) -> str:
  root = config.data.data_dir or os.environ.get("MM_JAX_DATA_DIR") or "~/.cache/mm_jax"
  return os.path.expanduser(root)


def mixture_key(config) -> str:
  mixture = config.data.mixture
  return f"embedded-{config.data.embedded_scale}" if mixture == "embedded" else mixture


def tfds_data_dir(config) -> str:
  """Where the TFDS datasets live: the embedded build per scale, else data_root itself."""
  if config.data.mixture == "embedded":
    return os.path.join(data_root(config), f"embedded_{config.data.embedded_scale}")
  return data_root(config)


def task_names(config) -> list[str]:
  names = [n.strip() for n in str(config.data.tasks).split(",") if n.strip()]
  if not names:
    raise ConfigError("config.data.tasks is empty: name at least one task")
  return names


def build_tasks(config) -> dict[str, tasks_lib.Task]:
  return {name: tasks_lib.resolve(name, config.data.mixture) for name in task_names(config)}


def text_task_names(config) -> list[str]:
  return [
    name
    for name, task in build_tasks(config).items()
    if "language" in (task.signature.input_modality, task.signature.target_modality)
  ]


def text_length(config, task_name: str, field: str) -> int:
  """Padded length of a task's "inputs" or "targets" text: config.data.max_text_length unless
  config.data.input_lengths / target_lengths name the task (short transcripts need not pay for
  the longest translation)."""
  overrides = config.data["input_lengths" if field == "inputs" else "target_lengths"] or {}
  return int(overrides.get(task_name, config.data.max_text_length))


def data_parallel_from_config(config) -> int:
  import jax

  shape = sharding.mesh_shape(config.mesh, jax.device_count())
  return shape["data"] * shape["expert"]


def image_size(config, task) -> int:
  if task.signature.target_modality == "categorical":
    return int(config.data.image_size)
  return int(config.data.caption_image_size)


def example_shapes(config, task) -> dict[str, tuple[tuple[int, ...], type]]:
  """{key: (shape, dtype)} of one training example as this pipeline builds it, without data."""
  sig = task.signature
  if sig.input_modality == "language":
    shapes = {"inputs": ((text_length(config, task.name, "inputs"),), np.int32)}
  elif sig.input_modality == "image":
    size = image_size(config, task)
    shapes = {"inputs": ((size, size, int(config.model.image_channels)), np.float32)}
  else:
    frames = int(config.data.max_audio_frames)
    shapes = {
      "inputs": ((frames, num_mel_bins(config)), np.float32),
      "inputs_mask": ((frames,), np.float32),
    }
  categorical = sig.target_modality == "categorical"
  shapes["targets"] = (
    () if categorical else (text_length(config, task.name, "targets"),),
    np.int32,
  )
  shapes["target_space"] = ((), np.int32)
  return shapes


def num_mel_bins(config) -> int:
  # Read strictly: every config has the field, and a default here once hid a misspelt name.
  return int(config.model.audio_num_mel_bins)


# The fields of config.data that set only how the tasks share a step: a saved data position,
# counted in examples per task, continues under any of their values.
MIXING_FIELDS = ("weights", "mixing", "global_batch_size")


class ReadLayout:
  """What a saved data position depends on: the data config (not where the data lives, nor the
  mixture) and which process of how many reads. A position saved under another layout is no
  position here. Positions count examples per task, so a resumed run may change the mixture:
  each task's reader skips the examples it had consumed and batches the rest at its new size."""

  def __init__(self, config, batch_sizes: dict[str, int], process_index: int, process_count: int):
    self.config, self.batch_sizes = config, batch_sizes
    self.process_index, self.process_count = process_index, process_count

  def _data_settings(self, without=("data_dir", *MIXING_FIELDS)) -> dict:
    return {k: v for k, v in self.config.data.to_dict().items() if k not in without}

  def fingerprint(self) -> str:
    return _digest([self._data_settings(), self.process_index, self.process_count])

  def _batches_fingerprint(self) -> str:
    """Positions counted in batches (state version 1) continue only the mixture that wrote them."""
    settings = [self._data_settings(("data_dir", "mixing")), self.batch_sizes]
    return _digest([*settings, self.process_index, self.process_count])

  def describe(self) -> dict:
    """The same, by name: a mismatch can then say what changed."""
    layout = {"config.data": self._data_settings()}
    layout["process (index, count)"] = [self.process_index, self.process_count]
    return json.loads(json.dumps(layout, default=str))

  def examples_consumed(self, state: dict) -> dict[str, int]:
    """Per task, the examples a reader of `state` had consumed (ConfigError unless `check`)."""
    self.check(state)
    if "examples" in state:
      return {name: int(n) for name, n in state["examples"].items()}
    return {name: int(n) * self.batch_sizes[name] for name, n in state["batches"].items()}

  def check(self, state: dict) -> None:
    """Raises ConfigError (one line) unless a reader of this layout can continue from `state`."""
    counted_in_examples = "examples" in state
    fingerprint = self.fingerprint() if counted_in_examples else self._batches_fingerprint()
    positions = state["examples"] if counted_in_examples else state["batches"]
    if state.get("fingerprint") == fingerprint and set(positions) == set(self.batch_sizes):
      return
    saved, here = (flatten_dict(x, sep=".") for x in (state.get("layout", {}), self.describe()))
    keys = [k for k in sorted(saved.keys() | here.keys()) if not _is_mixing(k)]
    changed = [k for k in keys if saved.get(k) != here.get(k)]
    if not saved:
      named = "data config, batch sizes or process layout (not recorded in this checkpoint)"
    elif changed:
      named = ", ".join(f"{k}: {saved.get(k)!r} then, {here.get(k)!r} now" for k in changed[:3])
    else:
      named = "the mixture: a position counted in batches continues only the mixture that wrote it"
    raise ConfigError(
      f"the checkpoint's data position was saved with other data settings ({named}): resume "
      "with the config.data, mesh and process count that wrote it, or use a new --workdir"
    )


def _is_mixing(key: str) -> bool:
  """A flattened layout key that names the mixture (version 1 layouts held the batch sizes)."""
  fields = ("local batch size", *(f"config.data.{field}" for field in MIXING_FIELDS))
  return any(key == f or key.startswith(f + ".") for f in fields)


def _digest(settings) -> str:
  return hashlib.sha1(json.dumps(settings, default=str).encode()).hexdigest()[:16]


def read_layout(config, batch_sizes, process_index: int, process_count: int) -> ReadLayout:
  """`batch_sizes`: this process's examples per step of each task (mixture.local_batch_sizes)."""
  return ReadLayout(config, batch_sizes, process_index, process_count)
