"""Gradient accumulation (config.train.microbatches): the same gradients as the whole batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import short_kernels

from configs.multimodel import get_config
from mm_jax import aot, grouping, mixture, run, sharding, validation
from mm_jax import step as step_lib
from mm_jax.data import layout, pipeline
from mm_jax.errors import ConfigError
from mm_jax.models.multimodel import MultiModel

# A categorical task and a group of two text tasks (split back per task by task_index): both
# kinds of per-token mean. The dense FFN and no CTC loss: the MoE's balance loss and the CTC loss
# become their mean over microbatches by design; everything else must add up exactly.
TASKS = "tasks=image_classification+translate_en_de+translate_de_en"


def config_with(data_dir, microbatches):
  config = short_kernels.apply(get_config(f"tiny,{TASKS},no_moe"))
  config.data.data_dir = str(data_dir)
  config.data.global_batch_size = 96  # 32 a task: 4 per device on 8, so up to 4 microbatches
  config.model.audio_ctc_weight = 0.0
  config.train.microbatches = microbatches
  config.train.loss_weights.translate_de_en = 2.0
  return config


def gradient_recorder():
  """An optimizer whose state after a step is that step's gradients (the params stay put)."""
  return optax.GradientTransformation(
    init=lambda params: jax.tree.map(jnp.zeros_like, params),
    update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
  )


@pytest.fixture(scope="module")
def real_batch(tiny_data_dir):
  config = config_with(tiny_data_dir, 1)
  pipeline.ensure_prepared(config)
  tasks = layout.build_tasks(config)
  plan, specs = step_lib.step_batch_specs(config, tasks, mixture.task_batch_sizes(config, 8))
  first = next(pipeline.TrainIterator(config, data_parallel=8))
  return plan, specs, grouping.merge_batches(plan, first)


def compiled_step(config, plan, specs, devices):
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.config_rules(config)
  model = MultiModel(run.model_config(config.model, "cpu"))
  tx = gradient_recorder()
  init = functools.partial(step_lib.init_state, model=model, tx=tx, plan=plan)
  _, state_shardings, jit_init = step_lib.traced_init(init, specs, mesh, rules)
  batch_shardings = jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim), specs)
  step = step_lib.jit_train_step(config, model, tx, plan, mesh, state_shardings, batch_shardings)
  with sharding.activate(mesh, rules):
    state = jit_init(step_lib.init_key(config))
    compiled = step.lower(state, specs, jax.random.key(0)).compile()
  return mesh, state, compiled


@pytest.fixture(scope="module")
def steps(tiny_data_dir, real_batch, devices):
  """{microbatches: (compiled step, its gradients, its metrics)} on a (data=8) mesh."""
  plan, specs, batch = real_batch
  out = {}
  for count in (1, 4):
    config = config_with(tiny_data_dir, count)
    mesh, state, compiled = compiled_step(config, plan, specs, devices)
    new_state, metrics = compiled(state, sharding.global_batch(batch, mesh), jax.random.key(0))
    out[count] = (compiled, jax.device_get(new_state.opt_state), jax.device_get(metrics))
  return out


def test_microbatched_gradients_equal_the_whole_batch(steps):
  _, want_grads, want_metrics = steps[1]
  _, got_grads, got_metrics = steps[4]
  flat_want = jax.tree_util.tree_leaves_with_path(want_grads)
  assert len(flat_want) > 50
  for (path, want), got in zip(flat_want, jax.tree.leaves(got_grads)):
    scale = float(np.max(np.abs(want)))
    assert scale > 0, jax.tree_util.keystr(path)  # the batch reaches every parameter
    np.testing.assert_allclose(
      got, want, atol=2e-5 * scale, rtol=1e-4, err_msg=jax.tree_util.keystr(path)
    )
  assert set(got_metrics) == set(want_metrics)
  for name, value in want_metrics.items():
    np.testing.assert_allclose(got_metrics[name], value, rtol=2e-5, atol=1e-6, err_msg=name)


def test_microbatches_hold_fewer_activations_and_move_no_data(steps):
  """Temporaries shrink with the microbatch count; the strided split adds no collectives."""
  temps = {
    n: compiled.memory_analysis().temp_size_in_bytes for n, (compiled, _, _) in steps.items()
  }
  assert temps[4] < 0.6 * temps[1], temps

  def collectives(compiled):
    found = aot.collectives(compiled.as_text())
    return {kind: found[kind] for kind in ("all-gather", "all-to-all", "collective-permute")}

  assert collectives(steps[4][0]) == collectives(steps[1][0])


@pytest.mark.parametrize(
  "count, message",
  [
    (0, "config.train.microbatches=0: use a positive integer"),
    (3, "config.train.microbatches=3 does not divide image_classification's 4 examples per "),
  ],
)
def test_bad_microbatch_counts_are_config_errors(tiny_data_dir, count, message):
  config = config_with(tiny_data_dir, count)
  with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
    validation.validate(config, num_devices=8, check_data=False)
