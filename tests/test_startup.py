"""The trainer checks its config and lowers its step before TensorFlow is imported.

TensorFlow, tensorflow_datasets and clu take about 6 s of single-threaded Python to import; train.py
imports them only once the step's compile has started, so they run beside it (docs/performance.md,
"Start-up and the first step"). A module-level import of any of them in what runs before that point
puts those seconds back on the start-up's critical path.
"""

import json
import os
import subprocess
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# What train.train_and_evaluate does before compile_in_background, on the default config.
_BEFORE_THE_COMPILE = """
import json, sys
import jax
from configs import multimodel
from mm_jax import checkpointing, run as run_lib, train

def data_modules():
  roots = ("tensorflow", "tensorflow_datasets", "clu", "keras")
  return sorted(m for m in sys.modules if m.split(".")[0] in roots)

config = multimodel.get_config()
run = run_lib.build(config, jax.devices()[:1])  # the default run: one CPU device
read = run.read_layout(0, 1)
jit_step = run.jit_step()
before = data_modules()
from mm_jax.data import pipeline  # what train.py imports once the compile has started
print(json.dumps({"groups": len(run.plan), "before": before, "after": len(data_modules())}))
"""


def test_the_step_is_prepared_without_importing_tensorflow():
  result = subprocess.run(
    [sys.executable, "-c", _BEFORE_THE_COMPILE],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  found = json.loads(result.stdout.strip().splitlines()[-1])
  assert found["groups"] >= 1
  assert found["before"] == []
  assert found["after"] > 0  # the check sees TensorFlow once the pipeline is imported
