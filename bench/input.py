"""Input pipeline throughput: examples/s per task and for the whole mixture, on this machine.

  python bench/input.py [--config=default] [--scale=tiny] [--batches=20]

Baselines measured in the same run: reading the same records from TFDS with no featurisation
(shuffle + repeat only); "vs raw read" is the pipeline's rate over that. "steps/s supplied" is the
examples/s over the task's per-step batch; "vs step" divides it by the steps/s of the real train
step (bench/train.py's in-process trainer, timed after the pipelines, `--step_steps` steps), so it
is the input headroom: the goal is >= 3x. `--step_steps=0` skips the step (no "vs step" column).
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from absl import logging  # noqa: E402

from configs.multimodel import get_config  # noqa: E402
from mm_jax.data import pipeline  # noqa: E402


def examples_per_second(iterator, batches: int, batch_size: int) -> float:
  """Examples/s over `batches` batches, after one warm-up batch."""
  next(iterator)  # warm-up: graph building, first file opens, prefetch fill
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * batch_size / (time.perf_counter() - start)


def _raw_rate(config, task, batches: int, batch_size: int) -> float:
  raw = pipeline.read_split(config, task, task.source.train_split, file_seed=0)
  raw = raw.shuffle(pipeline._shuffle_buffer(config, task), seed=0).repeat()
  # Records one at a time: raw audio and images have ragged shapes, so they cannot batch.
  return examples_per_second(raw.prefetch(batch_size).as_numpy_iterator(), batches * batch_size, 1)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="default")
  parser.add_argument("--scale", default=None, help="embedded build to read (tiny|full)")
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--step_steps", type=int, default=5, help="train steps timed; 0: none")
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)

  config = get_config(args.config)
  if args.scale:
    config.data.embedded_scale = args.scale
  if args.data_dir:
    config.data.data_dir = args.data_dir
  it = pipeline.TrainIterator(config, data_parallel=1)
  tokenizer = it.tokenizer
  rows = []
  for name, task in it.tasks.items():
    size = it.batch_sizes[name]
    raw = _raw_rate(config, task, args.batches, size)
    ds = pipeline.train_dataset(config, task, tokenizer, size).as_numpy_iterator()
    rows.append((name, size, raw, examples_per_second(ds, args.batches, size)))
  per_step = sum(it.batch_sizes.values())
  rows.append(("whole mixture", per_step, None, examples_per_second(it, args.batches, per_step)))
  steps_per_s = _train_steps_per_second(config, args.step_steps) if args.step_steps else None

  print(f"config {args.config}, mixture {pipeline.mixture_key(config)}, {os.cpu_count()} CPUs")
  if steps_per_s:
    print(f"train step: {steps_per_s:.2f} steps/s ({per_step * steps_per_s:.0f} examples/s)")
  print(
    f"{'task':22s} {'batch/step':>10s} {'raw ex/s':>10s} {'ex/s':>10s} {'vs raw read':>12s}"
    f" {'steps/s supplied':>17s}" + (f" {'vs step':>8s}" if steps_per_s else "")
  )
  for name, size, raw, rate in rows:
    raw_cells = f"{raw:10.0f} " if raw else f"{'':>10s} "
    vs_raw = f"{rate / raw:12.2f}" if raw else f"{'':>12s}"
    line = f"{name:22s} {size:10d} {raw_cells}{rate:10.0f} {vs_raw} {rate / size:17.1f}"
    print(line + (f" {rate / size / steps_per_s:8.2f}" if steps_per_s else ""))


def _train_steps_per_second(config, steps: int) -> float:
  """Median rate of the real jitted train step on this config (bench/train.py's trainer)."""
  from bench import train as train_bench

  trainer = train_bench.start_trainer(config)
  return 1.0 / statistics.median(train_bench.step_seconds(trainer, steps))


if __name__ == "__main__":
  from bench import results

  with results.recorded("input"):
    main()
