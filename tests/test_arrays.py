"""Batches saved as arrays (mm_jax/data/arrays.py) read back, without TensorFlow, equal to what the
tf.data pipeline gives the trainer."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs.multimodel import get_config
from mm_jax import grouping
from mm_jax import run as run_lib
from mm_jax.data import arrays, pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Reads the saved steps, rebuilds the config and the run (as bench/gpu_step.py does), writes the
# arrays it read to one .npz and fails if anything loaded TensorFlow.
_READER = """
import sys
import jax
import numpy as np
from mm_jax import run
from mm_jax.data import arrays
saved = arrays.ArrayBatches(sys.argv[1])
built = run.build(saved.config(), jax.devices()[:1], check_data=False)
saved.check(built)
steps = enumerate(saved)
flat = {f"{i}/{g}/{k}": v for i, step in steps for g, b in step.items() for k, v in b.items()}
np.savez(sys.argv[2], **flat)
assert "tensorflow" not in sys.modules, sorted(m for m in sys.modules if "tensorflow" in m)
print("no tensorflow")
"""


@pytest.fixture(scope="module")
def saved(tiny_data_dir, tmp_path_factory):
  config = get_config("tiny")
  config.data.data_dir = str(tiny_data_dir)
  out = str(tmp_path_factory.mktemp("saved_batches"))
  source = ("configs/multimodel.py", "tiny", {"data.data_dir": str(tiny_data_dir)})
  arrays.save(config, 2, out, devices=jax.devices()[:1], config_source=source)
  return config, out


def test_saved_batches_read_without_tensorflow_equal_the_pipelines(saved, tmp_path):
  config, out = saved
  dump = tmp_path / "read.npz"
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  result = subprocess.run(
    [sys.executable, "-c", _READER, out, str(dump)], env=env, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "no tensorflow" in result.stdout

  # The reference: the trainer's own reading, a fresh pipeline merged into task groups.
  run = run_lib.build(config, jax.devices()[:1])
  train_iter = pipeline.TrainIterator(config, tasks=run.tasks, read_layout=run.read_layout(0, 1))
  expected = {}
  for i in range(2):
    for group, batch in grouping.merge_batches(run.plan, next(train_iter)).items():
      expected.update({f"{i}/{group}/{key}": value for key, value in batch.items()})
  with np.load(dump) as read:
    assert sorted(read.files) == sorted(expected)
    for name, value in expected.items():
      assert read[name].dtype == value.dtype, name
      np.testing.assert_array_equal(read[name], value, err_msg=name)
  groups = {name.split("/")[1] for name in expected}
  assert groups == {g.name for g in run.plan} and len(groups) == 4  # every task group, tiny's 4
  assert not np.array_equal(
    expected["0/image_to_categorical/inputs"], expected["1/image_to_categorical/inputs"]
  )


def test_a_changed_config_is_refused(saved, tmp_path):
  _, out = saved
  changed = tmp_path / "changed"
  changed.mkdir()
  manifest = json.loads((pathlib.Path(out) / arrays.MANIFEST).read_text())
  assert arrays.ArrayBatches(out).config().data.global_batch_size == 64
  manifest["config"]["data"]["global_batch_size"] = 128  # as if the config file had changed since
  (changed / arrays.MANIFEST).write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match="rebuilds another config"):
    arrays.ArrayBatches(str(changed)).config()
