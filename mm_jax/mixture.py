"""How the tasks share a step: the mixing strategies of config.data.mixing.

Every step holds one batch of every task; a strategy sets each task's share of the step's
config.data.global_batch_size (task_batch_sizes rounds the shares to whole examples):

  "weights"      share ∝ config.data.weights[task]
  "examples"     share ∝ nᵢ, each task's number of training examples, capped at
                 config.data.mixing.max_examples (0: no cap)
  "temperature"  share ∝ nᵢ^(1/T), T = config.data.mixing.temperature, the cap applied first:
                 T = 1 is "examples", a larger T moves the shares towards equal

nᵢ is the size of the task's training split as its prepared TFDS dataset records it (the
embedded mixture is built on first use). Only "examples" and "temperature" need it before the
run starts; every run prints it in its mixture table.

A run may resume under another mixture: the data position is counted in examples per task
(data/layout.py), so each task continues where it stopped, at its new batch size.
"""

import functools

import numpy as np

from mm_jax.data import layout
from mm_jax.errors import ConfigError

STRATEGIES = ("weights", "examples", "temperature")


def strategy(config) -> str:
  return config.data.mixing.strategy


def rates(config, tasks: dict, counts: dict[str, int] | None = None) -> dict[str, float]:
  """Each task's unnormalised rate under the config's strategy. `counts` (default: read from the
  prepared datasets) are the training examples per task; "weights" needs none."""
  mixing = config.data.mixing
  if mixing.strategy == "weights":
    weights = config.data.weights or {}
    return {name: float(weights.get(name, t.spec.default_weight)) for name, t in tasks.items()}
  counts = counts if counts is not None else example_counts(config, tasks)
  capped = {name: _capped(counts[name], int(mixing.max_examples)) for name in tasks}
  power = 1.0 if mixing.strategy == "examples" else 1.0 / float(mixing.temperature)
  return {name: float(n) ** power for name, n in capped.items()}


def _capped(count: int, cap: int) -> int:
  return min(count, cap) if cap > 0 else count


def shares(config, tasks: dict, counts: dict[str, int] | None = None) -> dict[str, float]:
  """Each task's share of a step's examples before rounding (they sum to 1)."""
  task_rates = rates(config, tasks, counts)
  total = sum(task_rates.values())
  return {name: rate / total for name, rate in task_rates.items()}


def rate_field(config, name: str) -> str:
  """The config field a task's rate comes from, for error messages."""
  if strategy(config) == "weights":
    return f"config.data.weights.{name}"
  return f"config.data.mixing.strategy={strategy(config)!r} ({name}'s training examples)"


def task_batch_sizes(config, data_parallel: int, counts: dict[str, int] | None = None):
  """Global per-task batch sizes: global_batch_size split by the mixing strategy's shares
  (mixture.py), each a multiple of dp. `counts`: training examples per task, if known."""
  tasks = layout.build_tasks(config)
  task_rates = rates(config, tasks, counts)
  for name, rate in task_rates.items():
    if rate <= 0:
      raise ConfigError(
        f"{rate_field(config, name)}={rate}: use a positive weight or drop {name} from data.tasks"
      )
  total = sum(task_rates.values())
  sizes = {}
  for name in tasks:
    share = config.data.global_batch_size * task_rates[name] / total
    size = int(round(share / data_parallel)) * data_parallel
    if size <= 0:
      need = int(np.ceil(data_parallel * total / task_rates[name]))
      raise ConfigError(
        f"{rate_field(config, name)} gives {name} {share:.2f} examples per step, fewer "
        f"than the data-parallel degree {data_parallel}: set config.data.global_batch_size >= "
        f"{need}"
      )
    sizes[name] = size
  return sizes


def local_batch_sizes(config, data_parallel: int, process_count: int) -> dict[str, int]:
  sizes = task_batch_sizes(config, data_parallel)
  for name, size in sizes.items():
    if size % process_count:
      raise ConfigError(
        f"task {name} batch {size} does not split over {process_count} processes: make "
        "config.data.global_batch_size a multiple of the process count times the task count"
      )
  return {name: size // process_count for name, size in sizes.items()}


def example_counts(config, tasks: dict) -> dict[str, int]:
  """Training examples per task, from the prepared datasets' metadata (TensorFlow is imported,
  and the embedded mixture built if it is not yet)."""
  from mm_jax.data import prepare  # noqa: PLC0415 (TensorFlow: only when counts are needed)

  prepare.ensure_prepared(config)
  data_dir = layout.tfds_data_dir(config)
  return {
    name: _split_size(data_dir, task.source.tfds_name, task.source.train_split)
    for name, task in tasks.items()
  }


@functools.lru_cache(maxsize=64)
def _split_size(data_dir: str, tfds_name: str, split: str) -> int:
  import tensorflow_datasets as tfds  # noqa: PLC0415

  return int(tfds.builder(tfds_name, data_dir=data_dir).info.splits[split].num_examples)


def describe(config, tasks: dict, batch_sizes: dict[str, int]) -> str:
  """The start-of-run lines: the strategy, then the table."""
  mixing = config.data.mixing
  how = {
    "weights": "by config.data.weights",
    "examples": "by training examples",
    "temperature": f"by training examples^(1/{float(mixing.temperature):g})",
  }[mixing.strategy]
  if mixing.strategy != "weights" and mixing.max_examples:
    how += f", each count capped at {int(mixing.max_examples):,}"
  counts = example_counts(config, tasks)
  return f"mixture {how}:\n" + table(tasks, counts, batch_sizes)


def table(tasks, counts: dict[str, int], batch_sizes: dict[str, int]) -> str:
  """The mixture as the run trains on it: one row per task, after rounding to whole examples."""
  total = sum(batch_sizes.values())
  lines = [
    "| task | examples | share | examples per step |",
    "|---|---:|---:|---:|",
  ]
  for name in tasks:
    share = 100.0 * batch_sizes[name] / total
    lines.append(f"| {name} | {counts[name]:,} | {share:.1f}% | {batch_sizes[name]} |")
  return "\n".join(lines)
