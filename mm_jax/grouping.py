"""Tasks that share a signature and shapes run as one concatenated batch.

Four translation directions and parsing (language → language, same lengths) become one forward
pass instead of five; each example keeps its `target_space` and gains a `task_index` so the loss
can still be reported per task. Grouping happens on the host, before batches reach devices, so
the jitted step runs each modality net once per group rather than once per task (and the body once
for all groups: models/packing.py).
"""

import dataclasses

import jax
import numpy as np

from mm_jax.models.signature import TaskSignature


@dataclasses.dataclass(frozen=True)
class Group:
  name: str
  signature: TaskSignature
  tasks: tuple[str, ...]


def _shape_key(batch: dict) -> tuple:
  return tuple(
    sorted((k, v.shape[1:], str(v.dtype)) for k, v in batch.items() if not k.startswith("raw_"))
  )


def plan_groups(signatures: dict[str, TaskSignature], example_batches: dict[str, dict]):
  """Groups tasks (in their given order) whose signature and per-example shapes match."""
  groups: dict[tuple, list[str]] = {}
  for task, signature in signatures.items():
    groups.setdefault((signature, _shape_key(example_batches[task])), []).append(task)
  plan = []
  for (signature, _), tasks in groups.items():
    name = f"{signature.input_modality}_to_{signature.target_modality}"
    if any(g.name == name for g in plan):
      name = f"{name}_{len(plan)}"
    plan.append(Group(name=name, signature=signature, tasks=tuple(tasks)))
  return tuple(plan)


def device_arrays(batch: dict) -> dict:
  """Drops host-only keys (`raw_*` reference strings) before a batch goes to devices."""
  return {k: v for k, v in batch.items() if not k.startswith("raw_")}


def merge_batches(plan, task_batches: dict[str, dict]) -> dict[str, dict]:
  """Concatenates each group's task batches along the batch axis and adds `task_index`."""
  merged = {}
  for group in plan:
    parts = [device_arrays(task_batches[t]) for t in group.tasks]
    batch = {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}
    batch["task_index"] = np.concatenate(
      [np.full(len(p["targets"]), i, np.int32) for i, p in enumerate(parts)]
    )
    merged[group.name] = batch
  return merged


def batch_specs(example_shapes: dict, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """One task's batch as shapes, from layout.example_shapes: {key: (shape, dtype)}."""
  return {
    key: jax.ShapeDtypeStruct((batch_size, *shape), dtype)
    for key, (shape, dtype) in example_shapes.items()
  }


def merge_specs(plan, task_specs: dict[str, dict]) -> dict[str, dict]:
  """merge_batches on shapes: each group's tasks concatenated, plus `task_index`."""
  merged = {}
  for group in plan:
    parts = [task_specs[t] for t in group.tasks]
    size = sum(p["targets"].shape[0] for p in parts)
    batch = {k: jax.ShapeDtypeStruct((size, *v.shape[1:]), v.dtype) for k, v in parts[0].items()}
    batch["task_index"] = jax.ShapeDtypeStruct((size,), np.int32)
    merged[group.name] = batch
  return merged
