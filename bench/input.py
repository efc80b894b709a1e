"""Input pipeline throughput: examples/s per task and for the whole mixture, on this machine.

  python bench/input.py [--config=default] [--scale=tiny] [--batches=20]

Baseline measured in the same run: reading the same records from TFDS with no featurisation
(shuffle + repeat only); "vs raw read" is the pipeline's rate over that. "steps/s supplied" is the
examples/s over the task's per-step batch: divide by the trainer's steps/s (bench/model.py or the
train loop's report) for the input headroom; the goal is >= 3x.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from absl import logging  # noqa: E402

from configs.multimodel import get_config  # noqa: E402
from mm_jax.data import pipeline  # noqa: E402


def _rate(iterator, batches: int, batch_size: int) -> float:
  next(iterator)  # warm-up: graph building, first file opens, prefetch fill
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * batch_size / (time.perf_counter() - start)


def _raw_rate(config, task, batches: int, batch_size: int) -> float:
  raw = pipeline.read_split(config, task, task.source.train_split, file_seed=0)
  raw = raw.shuffle(pipeline._shuffle_buffer(config, task), seed=0).repeat()
  # Records one at a time: raw audio and images have ragged shapes, so they cannot batch.
  return _rate(raw.prefetch(batch_size).as_numpy_iterator(), batches * batch_size, 1)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="default")
  parser.add_argument("--scale", default=None, help="embedded build to read (tiny|full)")
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--data_dir", default=None)
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)

  config = get_config(args.config)
  if args.scale:
    config.data.embedded_scale = args.scale
  if args.data_dir:
    config.data.data_dir = args.data_dir
  it = pipeline.TrainIterator(config, data_parallel=1)
  tokenizer = it.tokenizer
  print(f"config {args.config}, mixture {pipeline.mixture_key(config)}, {os.cpu_count()} CPUs")
  print(
    f"{'task':22s} {'batch/step':>10s} {'raw ex/s':>10s} {'ex/s':>10s} {'vs raw read':>12s}"
    f" {'steps/s supplied':>17s}"
  )
  for name, task in it.tasks.items():
    size = it.batch_sizes[name]
    raw = _raw_rate(config, task, args.batches, size)
    ds = pipeline.train_dataset(config, task, tokenizer, size).as_numpy_iterator()
    rate = _rate(ds, args.batches, size)
    print(f"{name:22s} {size:10d} {raw:10.0f} {rate:10.0f} {rate / raw:12.2f} {rate / size:17.1f}")
  per_step = sum(it.batch_sizes.values())
  rate = _rate(it, args.batches, per_step)
  print(
    f"{'whole mixture':22s} {per_step:10d} {'':>10s} {rate:10.0f} {'':>12s} {rate / per_step:17.1f}"
  )


if __name__ == "__main__":
  main()
