"""test_multiprocess.py's one-process reference run, as a process of its own.

`python tests/two_process_reference.py WORKDIR DATA_DIR TASKS OVERRIDES_JSON` trains the tiny
config on all of this process's devices while its data iterator yields the global batch of a
two-process run: process 0's shard's rows, then process 1's (each read by the real pipeline). It
writes the logged losses to WORKDIR/losses.json. A process of its own, like the two it is compared
with, so that the test gives all three the same XLA flags.
"""

import json
import os
import sys

import numpy as np

_REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, _REPO)  # this checkout's mm_jax and configs
import short_kernels  # noqa: E402

from configs import multimodel as multimodel_config  # noqa: E402
from mm_jax import train  # noqa: E402
from mm_jax.data import pipeline  # noqa: E402

_PIPELINE_ITERATOR = pipeline.TrainIterator  # the real one (main swaps in the class below)


class TwoProcessData:
  """The global batch of a two-process run, read in one process: shard 0's rows, then shard 1's."""

  def __init__(self, config, *, tasks, read_layout):
    assert (read_layout.process_index, read_layout.process_count) == (0, 1)
    # Each shard reads as process i of 2 would (the data-parallel size from the config's mesh).
    self.shards = [_PIPELINE_ITERATOR(config, i, 2, tasks=tasks) for i in range(2)]

  @property
  def tokenizer(self):
    return self.shards[0].tokenizer

  def __iter__(self):
    return self

  def __next__(self):
    a, b = (next(s) for s in self.shards)
    return {t: {k: np.concatenate([a[t][k], b[t][k]]) for k in a[t]} for t in a}

  def counters(self):
    return self.shards[0].counters()

  def get_state(self):
    return [s.get_state() for s in self.shards]


def main(workdir, data_dir, tasks, overrides):
  config = short_kernels.apply(multimodel_config.get_config(f"tiny,tasks={tasks}"))
  config.data.data_dir = data_dir
  config.update_from_flattened_dict(json.loads(overrides))
  pipeline.TrainIterator = TwoProcessData  # train.py reads the class from the module at run time
  result = train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "losses.json"), "w") as f:
    json.dump([metrics["loss"] for _, metrics in result["train"]], f)


if __name__ == "__main__":
  main(*sys.argv[1:])
