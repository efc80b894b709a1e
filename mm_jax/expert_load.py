"""What each task does with the experts: per MoE layer and task, the share of the task's expert
assignments each expert takes, the share dropped for want of capacity, and the balance loss of
the task's tokens alone.

The MoE layer sums its routing decisions per task as it routes (moe.task_routing_sums; the step
passes each example's task as "task_onehot"), so nothing is computed twice; the train step and
evaluation turn the sums into the scalars below (config.train.expert_load), logged to TensorBoard
as train/moe/... and eval/moe/...:

  moe/<layer>/<task>/expert_<e>     share of the task's assignments (k per token) going to expert e;
                                    a task's shares sum to 1 over the experts
  moe/<layer>/<task>/dropped        share of the task's assignments that found no capacity
  moe/<layer>/<task>/balance_loss   the layer's balance loss over the task's tokens alone

<layer> is "encoder" or "decoder" (the body has one MoE layer in each); a task whose targets are
class labels never reaches the decoder and has no decoder rows.
"""

import jax
import jax.numpy as jnp

from mm_jax.models import moe

TAG = "task_routing"  # what the MoE layer sows its per-task sums as


def task_onehot(task_index, offset: int, num_tasks: int):
  """[B] index of each example's task within its group -> [B, num_tasks] among the run's."""
  return jax.nn.one_hot(task_index + offset, num_tasks, dtype=jnp.float32)


def layer_name(path: tuple[str, ...]) -> str:
  """("encoder", "ffn", "ffn") -> "encoder": the sown sums' module path without the FFN scopes."""
  return "/".join(part for part in path if part != "ffn")


def routing_sums(intermediates) -> dict[str, dict]:
  """{layer: the layer's per-task sums} from a model's "intermediates" collection."""
  found = {}

  def visit(node, path):
    for key, value in node.items():
      if key == TAG:
        for sums in value:  # one entry per call of the layer
          found[layer_name(path)] = add(found.get(layer_name(path)), sums)
      elif isinstance(value, dict):
        visit(value, (*path, key))

  visit(intermediates, ())
  return found


def add(total, sums):
  """Sums of several forward passes (groups applied one by one, microbatches, held-out batches)."""
  return sums if total is None else jax.tree.map(jnp.add, total, sums)


def metrics(sums_by_layer, tasks_by_layer, k: int, balance_loss: str) -> dict:
  """The scalars of the module docstring. `tasks_by_layer`: {layer: {task: its row}} for the
  tasks that reach the layer."""
  out = {}
  for layer, sums in sums_by_layer.items():
    assignments = jnp.sum(sums["assigned"], axis=-1)
    shares = sums["assigned"] / jnp.maximum(assignments, 1.0)[:, None]
    dropped = 1.0 - jnp.sum(sums["kept"], axis=-1) / jnp.maximum(assignments, 1.0)
    balance = moe.balance_from_sums(sums, sums["tokens"], k, balance_loss)
    for task, row in tasks_by_layer[layer].items():
      prefix = f"moe/{layer}/{task}"
      for e in range(shares.shape[-1]):
        out[f"{prefix}/expert_{e}"] = shares[row, e]
      out[f"{prefix}/dropped"] = dropped[row]
      out[f"{prefix}/balance_loss"] = balance[row]
  return out


def tasks_by_layer(layers, task_names, language_targets) -> dict[str, dict[str, int]]:
  """{layer: {task: row}}: every task reaches the encoder; only `language_targets` the decoder."""
  rows = {task: row for row, task in enumerate(task_names)}
  return {
    layer: {t: r for t, r in rows.items() if layer != "decoder" or t in language_targets}
    for layer in layers
  }
