"""The `fsdp` config modifier: parameters and Adam moments split over the data-parallel devices.

On 8 devices each holds about an eighth of the parameters and moments, and a train step gives the
losses and the updated parameters of the replicated run (the unsharded reference).
"""

import jax
import numpy as np
import pytest
import short_kernels

from configs.multimodel import get_config
from mm_jax import grouping, sharding
from mm_jax import run as run_lib
from mm_jax.data import pipeline

TASKS = "tasks=image_classification+speech_recognition+translate_en_de"


def config_for(data_dir, fsdp: bool):
  config = short_kernels.apply(get_config(f"tiny,{TASKS}" + (",fsdp" if fsdp else "")))
  config.data.data_dir = str(data_dir)
  config.mesh.data = 8
  return config


def per_device_bytes(tree, shardings) -> int:
  """Bytes one device holds: each leaf's shard shape, from its sharding."""
  leaves = jax.tree.leaves(tree)
  return sum(
    int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
    for x, s in zip(leaves, jax.tree.leaves(shardings), strict=True)
  )


@pytest.fixture(scope="module")
def runs(tiny_data_dir, devices):
  """{fsdp: (run, state after one step, metrics)} for the same batch and initial parameters."""
  first_config = config_for(tiny_data_dir, False)
  pipeline.ensure_prepared(first_config)
  out = {}
  for fsdp in (False, True):
    run = run_lib.build(config_for(tiny_data_dir, fsdp), devices)
    reader = pipeline.TrainIterator(run.config, tasks=run.tasks, read_layout=run.read_layout(0, 1))
    merged = grouping.merge_batches(run.plan, next(reader))
    state = run.init_state()
    with run.activate():
      batch = sharding.global_batch(merged, run.mesh)
      new_state, metrics = run.jit_step()(state, batch, jax.random.key(0))
    out[fsdp] = (run, jax.device_get(new_state), jax.device_get(metrics))
  return out


def test_fsdp_holds_an_eighth_of_the_parameters_and_moments(runs):
  for part in ("params", "opt_state"):
    held = {}
    for fsdp, (run, _, _) in runs.items():
      tree, shardings = getattr(run.abstract_state, part), getattr(run.state_shardings, part)
      held[fsdp] = per_device_bytes(tree, shardings)
    ratio = held[True] / held[False]
    # Parameters without an embedding axis (a few biases and class heads) stay whole.
    assert 1 / 8 <= ratio < 1.3 / 8, (part, held)


def test_fsdp_step_equals_the_replicated_step(runs):
  _, want_state, want_metrics = runs[False]
  _, got_state, got_metrics = runs[True]
  for name, value in want_metrics.items():
    np.testing.assert_allclose(got_metrics[name], value, rtol=2e-5, atol=1e-6, err_msg=name)
  flat_want = jax.tree_util.tree_leaves_with_path(want_state.params)
  for (path, want), got in zip(flat_want, jax.tree.leaves(got_state.params), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
