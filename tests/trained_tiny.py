"""A tiny trained run shared by test_predict.py and test_gallery.py (trained once per test run)."""

import built_once  # noqa: E402
import short_kernels  # noqa: E402

from configs import multimodel as multimodel_config  # noqa: E402

# One task per input modality: a PNG, a WAV and a sentence each have a task to go to.
TASKS = "tasks=image_classification+speech_recognition+translate_en_de"


def tiny_config(data_dir):
  config = short_kernels.apply(multimodel_config.get_config(f"tiny,{TASKS}"))
  config.data.data_dir = str(data_dir)
  config.train.num_steps = 2
  config.train.eval_every = 1000
  config.train.eval_batches = 0
  config.train.checkpoint_every = 2
  config.decode.max_decode_length = 8
  return config


def trained_workdir(tmp_path_factory, data_dir):
  """Trains 2 steps into <run tmp>/trained_tiny the first time in any worker; later calls reuse it.

  On one device: its step compiles without SPMD partitioning. The saved config keeps
  mesh.data = -1, so predict and gallery restore the checkpoint onto all 8 devices.
  """

  def train_into(workdir):
    import jax

    from mm_jax import train

    train.train_and_evaluate(tiny_config(data_dir), str(workdir), devices=jax.devices()[:1])

  return built_once.build_once(
    built_once.shared_root(tmp_path_factory) / "trained_tiny", train_into
  )
