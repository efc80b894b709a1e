"""Mesh resolution from config and its one-line errors."""

import numpy as np
import pytest

from mm_jax import grouping, sharding
from mm_jax.errors import ConfigError
from mm_jax.models.signature import TaskSignature


@pytest.mark.parametrize(
  "cfg, expected",
  [
    ({"data": -1}, {"data": 8, "expert": 1, "model": 1}),
    ({"data": 2, "expert": 4}, {"data": 2, "expert": 4, "model": 1}),
    ({"data": 2, "expert": -1, "model": 2}, {"data": 2, "expert": 2, "model": 2}),
  ],
)
def test_mesh_shape(cfg, expected):
  assert sharding.mesh_shape(cfg, 8) == expected


@pytest.mark.parametrize(
  "cfg, field",
  [
    ({"data": 3}, "config.mesh"),
    ({"data": -1, "expert": -1}, "config.mesh"),
    ({"data": -1, "expert": 3}, "config.mesh.data"),
    ({"data": 0, "expert": 8}, "config.mesh.data"),
    ({"pipeline": 2}, "config.mesh"),
  ],
)
def test_bad_mesh_is_one_line(cfg, field):
  with pytest.raises(ConfigError) as info:
    sharding.mesh_shape(cfg, 8)
  message = str(info.value)
  assert field in message and "\n" not in message


def test_make_mesh_axes(devices):
  mesh = sharding.make_mesh({"data": 2, "expert": 4})
  assert mesh.axis_names == sharding.MESH_AXES
  assert dict(mesh.shape) == {"data": 2, "expert": 4, "model": 1}
  assert sharding.data_parallel_size(mesh) == 8


def test_grouping_merges_same_signature_and_shapes():
  lang = TaskSignature("language", "language")
  image = TaskSignature("image", "categorical", num_classes=10)
  batches = {
    "a": {"inputs": np.ones((2, 5), np.int32), "targets": np.ones((2, 4), np.int32)},
    "b": {"inputs": np.zeros((4, 5), np.int32), "targets": np.zeros((4, 4), np.int32)},
    "c": {"inputs": np.ones((2, 6), np.int32), "targets": np.ones((2, 4), np.int32)},
    "d": {"inputs": np.ones((2, 3, 3, 3), np.float32), "targets": np.ones((2,), np.int32)},
  }
  signatures = {"a": lang, "b": lang, "c": lang, "d": image}
  plan = grouping.plan_groups(signatures, batches)
  assert [g.tasks for g in plan] == [("a", "b"), ("c",), ("d",)]
  merged = grouping.merge_batches(plan, batches)
  first = merged[plan[0].name]
  assert first["inputs"].shape == (6, 5)
  np.testing.assert_array_equal(first["task_index"], [0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(first["inputs"][2:], 0)
