"""Prints what the selected mixture feeds the model: counts, shapes and a few decoded examples.

  python -m mm_jax.data.inspect --config=configs/multimodel.py:tiny [--examples=3]

Builds the embedded mixture and trains the tokenizer on first use, like training does.
"""

from mm_jax import backend

backend.start_command(__name__)

import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mm_jax import cli, validation  # noqa: E402
from mm_jax.data import layout, pipeline  # noqa: E402
from mm_jax.errors import ConfigError  # noqa: E402


def _describe(batch: dict) -> str:
  return ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in batch.items() if k[:4] != "raw_")


def _show(value, tokenizer) -> str:
  if value.dtype == np.int32 and value.ndim == 1:
    return repr(tokenizer.decode(value))
  if value.ndim == 0:
    return str(int(value))
  return f"{value.dtype}{list(value.shape)} mean {value.mean():+.3f} std {value.std():.3f}"


def _length_line(batch: dict) -> str:
  parts = []
  for key in ("inputs", "targets"):
    value = batch[key]
    if value.dtype == np.int32 and value.ndim == 2:
      lengths = (value != 0).sum(1)
      parts.append(f"{key} tokens mean {lengths.mean():.1f} max {lengths.max()}/{value.shape[1]}")
  if "inputs_mask" in batch:
    frames = batch["inputs_mask"].sum(1)
    parts.append(f"audio frames mean {frames.mean():.0f} max {frames.max():.0f}")
  return "; ".join(parts)


def inspect(config, num_examples: int) -> None:
  tasks = layout.build_tasks(config)
  it = pipeline.TrainIterator(config, data_parallel=1)
  tokenizer = it.tokenizer
  step = next(it)
  print(f"mixture {pipeline.mixture_key(config)}  data {pipeline.tfds_data_dir(config)}")
  if tokenizer is not None:
    print(f"tokenizer: {tokenizer.vocab_size} pieces (config vocab {config.model.vocab_size})")
  for name, task in tasks.items():
    info = pipeline.builder(config, task).info
    splits = {s: info.splits[s].num_examples for s in info.splits} if info.splits else {}
    print(f"\n== {name}: {task.source.tfds_name}  {task.signature}  to '{task.target_space}'")
    print(f"   splits {splits}  train={task.source.train_split} eval={task.source.eval_split}")
    print(f"   per-step batch {it.batch_sizes[name]}: {_describe(step[name])}")
    print(f"   {_length_line(step[name])}")
    print(f"   counters after one batch: {it.counters()[name]}")
    batch = next(pipeline.eval_batches(config, name, 1, data_parallel=1, tokenizer=tokenizer))
    for i in range(min(num_examples, int(batch["raw_valid"].sum()))):
      inputs = _show(batch["inputs"][i], tokenizer)
      targets = _show(batch["targets"][i], tokenizer)
      print(f"   held-out {i}: {inputs}\n      -> {targets}")


def main(argv, values=None):
  del argv
  values = values or flags.FLAGS
  logging.set_verbosity(logging.WARNING)
  config = cli.config_or_exit(values["config"], "inspect")
  cli.check_at_least("inspect", values, "examples", 0)
  try:  # the trainer's checks: inspect reads what training would read, on one device
    validation.validate(config, num_devices=1)
  except ConfigError as error:
    cli.fail("inspect", f"config error: {error}")
  inspect(config, values.examples)


def define_flags(values):
  config_flags.DEFINE_config_file(
    "config", "configs/multimodel.py", "Config file.", flag_values=values
  )
  flags.DEFINE_integer("examples", 3, "Decoded examples to show per task.", flag_values=values)


if __name__ == "__main__":
  cli.start(define_flags, main)
