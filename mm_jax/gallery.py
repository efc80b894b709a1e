"""A gallery like the paper's figure: `python -m mm_jax.gallery --workdir=DIR`.

Writes DIR/gallery.html (self-contained: images and audio embedded as data URIs) and
DIR/gallery.png (a preview drawn with PIL). For each task of the run: a few held-out examples,
the input as the model's user would see it (image shown, audio playable, text), the decoded
output and the reference. Inputs are featurised by predict.py, i.e. exactly as in training.
"""

import base64
import contextlib
import dataclasses
import html
import io
import os

import numpy as np

from mm_jax import predict
from mm_jax.pages import write_page

# One colour per task's heading band (the screenshot test finds each task by its colour).
TASK_COLOURS = (
  (31, 119, 180),
  (255, 127, 14),
  (44, 160, 44),
  (214, 39, 40),
  (148, 103, 189),
  (140, 86, 75),
  (227, 119, 194),
  (23, 190, 207),
)


@dataclasses.dataclass
class Entry:
  kind: str  # "image" | "audio" | "text"
  shown: bytes | str  # image bytes, WAV bytes or the input text
  output: str
  reference: str
  preview: np.ndarray | None = None  # uint8 [H, W(, 3)] for the PNG (image, or a spectrogram)


def task_colour(index: int) -> tuple[int, int, int]:
  return TASK_COLOURS[index % len(TASK_COLOURS)]


def held_out_raw(config, task, count: int) -> list[dict]:
  """The first `count` usable held-out examples as canonical fields (numpy / str)."""
  import tensorflow as tf

  from mm_jax.data import pipeline

  raw = pipeline.read_split(config, task, task.source.eval_split, file_seed=None)
  seed = tf.constant([0, 0], tf.int64)
  out = []
  for example in raw.take(8 * count).map(lambda ex: task.source.adapter(ex, seed)):
    fields = {k: v.numpy() for k, v in example.items()}
    for key in ("input_text", "target_text"):
      if key in fields:
        fields[key] = fields[key].decode("utf-8", "replace")
    if task.source.text_fn is not None:
      try:
        fields["input_text"], fields["target_text"] = task.source.text_fn(
          fields.get("input_text", ""), fields.get("target_text", ""), config.data
        )
      except ValueError:
        continue
    out.append(fields)
    if len(out) == count:
      break
  return out


def _wav_bytes(samples: np.ndarray) -> bytes:
  import scipy.io.wavfile

  from mm_jax.data import features

  buffer = io.BytesIO()
  scipy.io.wavfile.write(buffer, features.SAMPLE_RATE, samples.astype(np.int16))
  return buffer.getvalue()


def _spectrogram_picture(frames: np.ndarray, mask: np.ndarray) -> np.ndarray:
  real = frames[mask > 0].T[::-1]  # bins x frames, low frequencies at the bottom
  scaled = (real - real.min()) / max(float(np.ptp(real)), 1e-6)
  return (255 * scaled).astype(np.uint8)


def task_entries(trained, predictor, task, count: int) -> list[Entry]:
  """Featurised, predicted and paired with references: one Entry per held-out example."""
  modality = task.signature.input_modality
  fields, examples = [], []
  for raw in held_out_raw(trained.config, task, count):
    try:
      if modality == "image":
        example = predict.image_example(trained.config, task, raw["image"])
      elif modality == "audio":
        example = predict.audio_example(trained.config, raw["speech"].astype(np.int16))
      else:
        example = predict.text_example(trained.config, task, trained.tokenizer, raw["input_text"])
    except predict.PredictError:
      continue  # e.g. audio longer than the model takes: the trainer drops those too
    example["target_space"] = np.int32(task.target_space_id)
    fields.append(raw)
    examples.append(example)
  outputs = predictor.outputs(task.name, examples) if examples else []
  entries = []
  for raw, example, output in zip(fields, examples, outputs):
    if task.signature.target_modality == "categorical":
      reference = predict.class_names(trained.config, task)[int(raw["label"])]
    else:
      reference = raw["target_text"]
    if modality == "image":
      pixels = ((example["inputs"] + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
      entries.append(Entry("image", bytes(raw["image"]), output, reference, pixels))
    elif modality == "audio":
      picture = _spectrogram_picture(example["inputs"], example["inputs_mask"])
      entries.append(Entry("audio", _wav_bytes(raw["speech"]), output, reference, picture))
    else:
      entries.append(Entry("text", raw["input_text"], output, reference))
  return entries


# --------------------------------------------------------------------------------------------
# HTML.


def _data_uri(mime: str, data: bytes) -> str:
  return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _image_mime(data: bytes) -> str:
  return "image/jpeg" if data[:2] == b"\xff\xd8" else "image/png"


def _input_html(entry: Entry) -> str:
  if entry.kind == "image":
    uri = _data_uri(_image_mime(entry.shown), entry.shown)
    return f'<img class="input" src="{uri}" alt="input image">'
  if entry.kind == "audio":
    return f'<audio controls src="{_data_uri("audio/wav", entry.shown)}"></audio>'
  return f'<div class="text">{html.escape(entry.shown)}</div>'


PAGE_STYLE = """
body { font-family: sans-serif; margin: 16px; background: #fafafa; }
section { margin-bottom: 18px; background: white; border: 1px solid #ddd; }
h2 { margin: 0; padding: 6px 10px; color: white; font-size: 18px; }
table { border-collapse: collapse; width: 100%; }
td, th { border-top: 1px solid #eee; padding: 6px 10px; text-align: left; vertical-align: top; }
th { font-size: 12px; color: #666; }
img.input { width: 96px; height: 96px; image-rendering: pixelated; }
.text { font-family: monospace; }
"""


def render_html(title: str, tasks: list[tuple[str, list[Entry]]]) -> str:
  parts = [
    "<!DOCTYPE html>",
    '<html><head><meta charset="utf-8">',
    f"<title>{html.escape(title)}</title><style>{PAGE_STYLE}</style></head><body>",
    f"<h1>{html.escape(title)}</h1>",
  ]
  for index, (name, entries) in enumerate(tasks):
    colour = "rgb({}, {}, {})".format(*task_colour(index))
    parts.append(f'<section id="{html.escape(name)}">')
    parts.append(f'<h2 style="background: {colour}">{html.escape(name)}</h2>')
    parts.append("<table><tr><th>input</th><th>model output</th><th>reference</th></tr>")
    for entry in entries:
      parts.append(
        f"<tr><td>{_input_html(entry)}</td>"
        f'<td class="text">{html.escape(entry.output)}</td>'
        f'<td class="text">{html.escape(entry.reference)}</td></tr>'
      )
    if not entries:
      parts.append('<tr><td colspan="3">no usable held-out examples</td></tr>')
    parts.append("</table></section>")
  parts.append("</body></html>")
  return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# PNG preview.


def render_png(title: str, tasks: list[tuple[str, list[Entry]]], width: int = 900):
  """A PIL image of the same content: a coloured band per task, then one row per example."""
  import PIL.Image
  import PIL.ImageDraw
  import PIL.ImageFont

  row, band, thumb = 72, 26, 64
  height = 40 + sum(band + row * max(len(entries), 1) + 8 for _, entries in tasks)
  canvas = PIL.Image.new("RGB", (width, height), "white")
  draw = PIL.ImageDraw.Draw(canvas)
  with contextlib.suppress(OSError):  # a font with accents where the system has one
    draw.font = PIL.ImageFont.truetype("DejaVuSans.ttf", 12)
  draw.text((10, 12), title, fill="black")
  y = 40
  for index, (name, entries) in enumerate(tasks):
    draw.rectangle([0, y, width, y + band], fill=task_colour(index))
    draw.text((10, y + 7), name, fill="white")
    y += band
    for entry in entries:
      if entry.preview is not None:
        picture = PIL.Image.fromarray(entry.preview).convert("RGB").resize((thumb, thumb))
        canvas.paste(picture, (10, y + 4))
      else:
        draw.text((10, y + 8), _clip(entry.shown, 40), fill="black")
      draw.text((300, y + 8), "output:    " + _clip(entry.output, 90), fill="black")
      draw.text((300, y + 30), "reference: " + _clip(entry.reference, 90), fill="gray")
      y += row
    y += row * (not entries) + 8
  return canvas


def _clip(text: str, limit: int) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------------------------
# The command.


def build(workdir: str, config=None, examples: int = 3, output_dir: str | None = None):
  """Writes gallery.html and gallery.png; returns their paths."""
  trained = predict.load_trained(workdir, config, check_data=True)
  predictor = predict.Predictor(trained)
  tasks = [
    (name, task_entries(trained, predictor, task, examples)) for name, task in trained.tasks.items()
  ]
  title = f"MultiModel gallery: {os.path.abspath(workdir)}, step {trained.step}"
  return write_page(
    output_dir or workdir, "gallery", render_html(title, tasks), render_png(title, tasks)
  )


def main(argv, values=None):
  from absl import flags

  from mm_jax import cli, validation
  from mm_jax.errors import ConfigError

  del argv
  values = values or flags.FLAGS
  config = cli.config_or_exit(values["config"], "gallery")
  cli.check_at_least("gallery", values, "examples", 1)
  try:
    if values.output_dir is not None:  # before any decoding: it must be writable
      validation.check_workdir(values.output_dir, "--output_dir")
    paths = build(values.workdir, config, values.examples, values.output_dir)
  except (predict.PredictError, ConfigError) as error:
    cli.fail("gallery", str(error))
  print("\n".join(paths))


def define_flags(values):
  from absl import flags
  from ml_collections import config_flags

  flags.DEFINE_string(
    "workdir", None, "the training run's directory", required=True, flag_values=values
  )
  flags.DEFINE_integer("examples", 3, "held-out examples per task", flag_values=values)
  flags.DEFINE_string(
    "output_dir", None, "where to write gallery.html/png (default: workdir)", flag_values=values
  )
  config_flags.DEFINE_config_file(
    "config", None, "config (default: the workdir's config.json)", flag_values=values
  )


if __name__ == "__main__":
  from mm_jax import backend

  backend.start_command(__name__)  # JAX and TensorFlow are imported only once main runs
  from mm_jax import cli

  cli.start(define_flags, main)
