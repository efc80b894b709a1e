"""Parameter counts of the MultiModel, per module, with clu's parameter overview.

  python -m mm_jax.models.summary --config=configs/multimodel.py:paper

Shapes come from `jax.eval_shape`, so even the paper size (d=1536, 120 experts) is summarised
without allocating it. One example batch per modality pairing makes every modality net exist.
"""

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags
from clu import parameter_overview
from ml_collections import config_flags

from mm_jax import run
from mm_jax.models.multimodel import MultiModel, TaskSignature

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/multimodel.py[:size,...]")
_NUM_CLASSES = flags.DEFINE_integer(
  "num_classes", None, "classification head size (default: 1000 for the paper mixture, else 10)"
)


def example_tasks(config, num_classes: int, batch_size: int = 1):
  """({task: batch}, {task: signature}) covering every input and target modality net."""
  m, data = config.model, config.data
  text = data.max_text_length
  image, caption = data.image_size, data.caption_image_size
  frames = data.max_audio_frames
  ids = lambda length: np.ones((batch_size, length), np.int32)
  space = np.zeros((batch_size,), np.int32)
  batches = {
    "text_to_text": {"inputs": ids(text), "targets": ids(text), "target_space": space},
    "image_to_class": {
      "inputs": np.zeros((batch_size, image, image, m.image_channels), np.float32),
      "targets": np.zeros((batch_size,), np.int32),
    },
    "image_to_text": {
      "inputs": np.zeros((batch_size, caption, caption, m.image_channels), np.float32),
      "targets": ids(text),
      "target_space": space,
    },
    "audio_to_text": {
      "inputs": np.zeros((batch_size, frames, m.audio_num_mel_bins), np.float32),
      "inputs_mask": np.ones((batch_size, frames), np.float32),
      "targets": ids(text),
      "target_space": space,
    },
  }
  signatures = {
    "text_to_text": TaskSignature("language", "language"),
    "image_to_class": TaskSignature("image", "categorical", num_classes),
    "image_to_text": TaskSignature("image", "language"),
    "audio_to_text": TaskSignature("audio", "language"),
  }
  return batches, signatures


def abstract_params(config, num_classes: int):
  """Parameter shapes of the whole model, from tracing init (nothing is allocated)."""
  model = MultiModel(run.model_config(config.model, jax.default_backend()))
  batches, signatures = example_tasks(config, num_classes)
  init = lambda rng: model.init(
    {"params": rng}, batches, signatures, train=False, method=MultiModel.all_tasks
  )
  return nn.unbox(jax.eval_shape(init, jax.random.key(0))["params"])


def summary(config, num_classes: int | None = None) -> str:
  if num_classes is None:
    num_classes = 1000 if config.data.mixture == "paper" else 10
  params = abstract_params(config, num_classes)
  m = config.model
  header = (
    f"MultiModel d={m.d} heads={m.num_heads} ffn={m.ffn} experts={m.moe.num_experts} "
    f"vocab={m.vocab_size} classes={num_classes}"
  )
  top = {name: sub for name, sub in params.items() if isinstance(sub, dict)}
  lines = [header, "", "parameters per top-level module:"]
  for name, sub in top.items():
    lines.append(f"  {name:<24} {parameter_overview.count_parameters(sub):>15,}")
  lines.append(f"  {'total':<24} {parameter_overview.count_parameters(params):>15,}")
  lines += ["", parameter_overview.get_parameter_overview(params, include_stats=False)]
  return "\n".join(lines)


def main(argv):
  del argv
  print(summary(_CONFIG.value, _NUM_CLASSES.value))


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
