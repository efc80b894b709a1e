"""The trainer end to end on the tiny config: meshes agree, loss falls, resume is exact, logs."""

import glob

import jax
import numpy as np
import pytest
import short_kernels  # noqa: E402

from configs import multimodel as multimodel_config  # noqa: E402
from mm_jax import train  # noqa: E402

pytestmark = pytest.mark.slow

# Few steps, no decoding evaluation: these tests are about the step, not the metrics.
STEPS = 4


# Every group the step unrolls costs tens of seconds of compilation per mesh here, so these
# tests use one group of two tasks (text -> text: encoder, mixer, decoder, MoE, per-task split).
# The modality nets are covered by test_model.py.
TASKS = "tasks=translate_en_de+translate_de_en"
LOSS_WEIGHTS = {"translate_en_de": 0.5, "translate_de_en": 2.0}  # config.train.loss_weights


def tiny_config(data_dir, **overrides):
  config = short_kernels.apply(multimodel_config.get_config(f"tiny,{TASKS}"))
  config.data.data_dir = str(data_dir)
  config.train.num_steps = STEPS
  config.train.log_every = 1
  config.train.eval_every = 1000
  config.train.eval_batches = 0
  config.train.checkpoint_every = 2
  config.model.moe.noisy_gating = False  # noise draws differ with the device layout
  # Routing groups never straddle devices; 16 tokens divides every device's share on every mesh
  # below, so the groups (and hence drops and balance losses) are the same on all of them.
  config.model.moe.group_size = 16
  config.train.loss_weights.update(LOSS_WEIGHTS)
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return config


def losses_of(result):
  return np.array([metrics["loss"] for _, metrics in result["train"]])


@pytest.fixture(scope="module")
def data_dir(tiny_data_dir):
  return tiny_data_dir


@pytest.fixture(scope="module")
def one_device_run(data_dir, tmp_path_factory):
  config = tiny_config(data_dir, **{"mesh.data": 1})
  workdir = tmp_path_factory.mktemp("one_device")
  result = train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  return workdir, losses_of(result), result["train"]


@pytest.mark.parametrize(
  "mesh",
  [{"data": 8}, {"data": 2, "expert": 4}, {"data": 2, "expert": 2, "model": 2}],
  ids=["data8", "data2_expert4", "data2_expert2_model2"],
)
def test_sharded_losses_equal_one_device(mesh, data_dir, one_device_run, tmp_path):
  config = tiny_config(data_dir, **{f"mesh.{k}": v for k, v in {"data": 1, **mesh}.items()})
  losses = losses_of(train.train_and_evaluate(config, str(tmp_path)))
  assert len(losses) == STEPS
  np.testing.assert_allclose(losses, one_device_run[1], rtol=2e-5, atol=2e-5)


def test_resume_continues_with_identical_losses(data_dir, one_device_run, tmp_path):
  one_device = {"mesh.data": 1}
  config = tiny_config(data_dir, **one_device, **{"train.num_steps": 2})
  first = train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  assert len(first["train"]) == 2
  config = tiny_config(data_dir, **one_device)
  second = train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  assert [step for step, _ in second["train"]] == [3, 4]
  np.testing.assert_array_equal(losses_of(second), one_device_run[1][2:])


def test_a_checkpoint_continues_on_any_mesh(data_dir, one_device_run, tmp_path):
  """Written on data=8, continued on data=2 x expert=4, then on one device: the losses of the run
  that never moved. No conversion step: each array is read into the new mesh's shardings."""
  segments = (
    ({"mesh.data": 8}, 2, None),
    ({"mesh.data": 2, "mesh.expert": 4}, 3, None),
    ({"mesh.data": 1}, 4, jax.devices()[:1]),
  )
  losses = []
  for mesh, steps, devices in segments:
    config = tiny_config(data_dir, **mesh, **{"train.num_steps": steps})
    result = train.train_and_evaluate(config, str(tmp_path), devices=devices)
    assert result["train"][0][0] == len(losses) + 1  # resumed where the last mesh stopped
    losses += list(losses_of(result))
  np.testing.assert_allclose(losses, one_device_run[1], rtol=2e-5, atol=2e-5)


def test_flat_optimizer_equals_per_leaf_across_a_resume(data_dir, one_device_run, tmp_path):
  """config.optimizer.flatten (clip and Adam on one vector) on a data-parallel mesh: the losses
  of the per-leaf optimizer on one device, also after a restore from its checkpoint."""
  flat = {"optimizer.flatten": True, "mesh.data": 8}
  config = tiny_config(data_dir, **flat, **{"train.num_steps": 2})
  first = train.train_and_evaluate(config, str(tmp_path))
  second = train.train_and_evaluate(tiny_config(data_dir, **flat), str(tmp_path))
  assert [step for step, _ in second["train"]] == [3, 4]
  losses = np.concatenate([losses_of(first), losses_of(second)])
  np.testing.assert_allclose(losses, one_device_run[1], rtol=2e-5, atol=2e-5)


def test_loss_decreases_on_a_fixed_batch(data_dir, tmp_path):
  # The optimizer of the other one-device runs (the step is compiled with its learning rate
  # schedule, so this run reuses their compiled step). Seen: the loss falls at every step, to
  # 0.70 of its first value by step 30.
  config = tiny_config(
    data_dir,
    **{"mesh.data": 1, "train.num_steps": 30},
    **{"train.fixed_batch": True, "train.checkpoint_every": 100},
  )
  losses = losses_of(train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1]))
  windows = losses.reshape(3, 10).mean(axis=1)
  assert np.all(np.diff(windows) < 0), losses
  assert losses[-1] < 0.8 * losses[0], losses


def test_tensorboard_has_per_task_scalars(one_device_run):
  from tensorboard.backend.event_processing import event_accumulator

  events = glob.glob(str(one_device_run[0] / "events.out.tfevents.*"))
  assert events
  tags = set()
  for path in events:
    acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
    acc.Reload()
    tags |= set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])
  for task in ("translate_en_de", "translate_de_en"):
    assert f"train/{task}/loss" in tags, sorted(tags)
    assert f"train/{task}/accuracy" in tags


def test_total_loss_weights_each_task(one_device_run):
  """The logged total is sum_t weight_t * loss_t + the auxiliary losses, recomputed here."""
  for _, metrics in one_device_run[2]:
    want = metrics["moe_aux_loss"] + sum(
      weight * metrics[f"{task}/loss"] for task, weight in LOSS_WEIGHTS.items()
    )
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-6)
