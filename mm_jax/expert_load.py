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

`python -m mm_jax.expert_load --workdir=DIR [--split=eval]` reads them back from the run's
TensorBoard events and draws one task × expert heatmap per layer: DIR/expert_load.html and
DIR/expert_load.png.
"""

import dataclasses
import glob
import html
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from mm_jax import pages
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


# --------------------------------------------------------------------------------------------
# Reading the scalars back, and the heatmap.

_NAME = re.compile(r"^(train|eval)/moe/(.+)/([^/]+)/(expert_(\d+)|dropped|balance_loss)$")


@dataclasses.dataclass
class Layer:
  name: str
  tasks: list[str]
  shares: np.ndarray  # [tasks, experts]
  dropped: np.ndarray  # [tasks]
  balance_loss: np.ndarray  # [tasks]


def read_events(workdir: str, split: str = "train") -> tuple[int, list[Layer]]:
  """The newest step's expert load of `split` ("train": the mean over the last logging interval;
  "eval": the last evaluation) from the run's TensorBoard events."""
  import tensorflow as tf  # noqa: PLC0415 (the event files' reader)

  values = {}  # step -> {(layer, task, field): value}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        match = _NAME.match(value.tag)
        if match and match[1] == split:
          scalar = (
            float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
          )
          values.setdefault(event.step, {})[match[2], match[3], match[4]] = scalar
  if not values:
    raise ValueError(
      f"{workdir} holds no {split}/moe/... scalars: train with config.train.expert_load"
    )
  step = max(values)
  return step, _layers(values[step], _task_order(workdir))


def _task_order(workdir: str) -> list[str]:
  """The run's tasks in its config's order (rows are drawn in it), or [] without config.json."""
  import json  # noqa: PLC0415

  try:
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
      return str(json.load(f)["data"]["tasks"]).split(",")
  except (OSError, ValueError, KeyError):
    return []


def _layers(values: dict, order: list[str]) -> list[Layer]:
  rank = {task: i for i, task in enumerate(order)}
  layers = []
  names = sorted({layer for layer, _, _ in values}, key=lambda n: (n != "encoder", n))
  for name in names:  # the encoder's first
    tasks = list(dict.fromkeys(task for layer, task, _ in values if layer == name))
    tasks.sort(key=lambda task: rank.get(task, len(rank)))
    experts = 1 + max(int(f[7:]) for layer, _, f in values if layer == name and f[:7] == "expert_")
    get = lambda task, field, name=name: values.get((name, task, field), np.nan)
    layers.append(
      Layer(
        name,
        tasks,
        np.array([[get(t, f"expert_{e}") for e in range(experts)] for t in tasks]),
        np.array([get(t, "dropped") for t in tasks]),
        np.array([get(t, "balance_loss") for t in tasks]),
      )
    )
  return layers


LOW, HIGH = (255, 255, 255), (8, 48, 107)  # the colour of share 0 and of the layer's largest


def colour(share: float, top: float) -> tuple[int, int, int]:
  """A cell's colour: white at 0, HIGH at the layer's largest share `top`."""
  f = 0.0 if top <= 0 else min(max(share / top, 0.0), 1.0)
  return tuple(int(round(lo + f * (hi - lo))) for lo, hi in zip(LOW, HIGH))


HEATMAP_STYLE = """
body { font-family: sans-serif; margin: 16px; }
table { border-collapse: collapse; margin-bottom: 20px; }
td, th { padding: 4px 8px; font-size: 13px; text-align: right; }
td.share { width: 44px; height: 28px; }
th.task { text-align: left; }
"""


def render_html(title: str, layers: list[Layer]) -> str:
  parts = [
    "<!DOCTYPE html>",
    '<html><head><meta charset="utf-8">',
    f"<title>{html.escape(title)}</title><style>{HEATMAP_STYLE}</style></head><body>",
    f"<h1>{html.escape(title)}</h1>",
    "<p>Share of each task's expert assignments (k per token) that each expert takes; a row sums"
    " to 100%. Dropped: assignments that found no capacity.</p>",
  ]
  for layer in layers:
    top = float(np.nanmax(layer.shares))
    experts = "".join(f"<th>{e}</th>" for e in range(layer.shares.shape[1]))
    parts.append(f'<h2>{html.escape(layer.name)}</h2><table id="{html.escape(layer.name)}">')
    parts.append(f"<tr><th></th>{experts}<th>dropped</th><th>balance loss</th></tr>")
    for row, task in enumerate(layer.tasks):
      cells = []
      for share in layer.shares[row]:
        rgb = colour(share, top)
        text = "white" if sum(rgb) < 384 else "black"
        style = f"background: rgb{rgb}; color: {text}"
        cells.append(f'<td class="share" style="{style}">{100 * share:.0f}</td>')
      parts.append(
        f'<tr><th class="task">{html.escape(task)}</th>{"".join(cells)}'
        f"<td>{100 * layer.dropped[row]:.1f}%</td><td>{layer.balance_loss[row]:.3f}</td></tr>"
      )
    parts.append("</table>")
  parts.append("</body></html>")
  return "\n".join(parts)


def render_png(title: str, layers: list[Layer]):
  """The same heatmaps drawn with PIL (for documents)."""
  import PIL.Image  # noqa: PLC0415
  import PIL.ImageDraw  # noqa: PLC0415

  cell, label, gap = 34, 170, 30
  experts = max(layer.shares.shape[1] for layer in layers)
  width = label + cell * experts + 150
  height = 40 + sum(gap + cell * (len(layer.tasks) + 1) for layer in layers)
  canvas = PIL.Image.new("RGB", (width, height), "white")
  draw = PIL.ImageDraw.Draw(canvas)
  draw.text((10, 12), title, fill="black")
  y = 40
  for layer in layers:
    top = float(np.nanmax(layer.shares))
    draw.text((10, y + 8), layer.name, fill="black")
    draw.text((label + cell * experts + 10, y + 8), "dropped", fill="black")
    for e in range(layer.shares.shape[1]):
      draw.text((label + cell * e + 12, y + 8), str(e), fill="black")
    y += cell
    for row, task in enumerate(layer.tasks):
      draw.text((10, y + 10), task, fill="black")
      for e, share in enumerate(layer.shares[row]):
        box = [label + cell * e, y, label + cell * (e + 1) - 2, y + cell - 2]
        rgb = colour(share, top)
        draw.rectangle(box, fill=rgb)
        text = "white" if sum(rgb) < 384 else "black"
        draw.text((box[0] + 6, y + 10), f"{100 * share:.0f}", fill=text)
      draw.text(
        (label + cell * experts + 10, y + 10), f"{100 * layer.dropped[row]:.1f}%", fill="black"
      )
      y += cell
    y += gap
  return canvas


def build(workdir: str, split: str = "train", output_dir: str | None = None):
  """Writes expert_load.html and expert_load.png; returns their paths."""
  step, layers = read_events(workdir, split)
  title = f"Expert load per task ({split}, step {step}): {os.path.abspath(workdir)}"
  page, picture = render_html(title, layers), render_png(title, layers)
  return pages.write_page(output_dir or workdir, "expert_load", page, picture)


def main(argv):
  from absl import flags  # noqa: PLC0415

  from mm_jax import cli  # noqa: PLC0415

  del argv
  values = flags.FLAGS
  try:
    paths = build(values.workdir, values.split, values.output_dir)
  except ValueError as error:
    cli.fail("expert_load", str(error))
  print("\n".join(paths))


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("workdir", None, "the training run's directory", required=True)
  flags.DEFINE_enum("split", "train", ["train", "eval"], "the training logs or the evaluation's")
  flags.DEFINE_string("output_dir", None, "where to write expert_load.html/png (default: workdir)")
  from mm_jax import cli

  app.run(main, flags_parser=cli.parse_flags)
