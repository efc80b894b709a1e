"""config.model.remat: recomputing the body blocks' activations changes memory, not gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import short_kernels  # noqa: E402

from configs.multimodel import get_config  # noqa: E402
from mm_jax import run, validation  # noqa: E402
from mm_jax.errors import ConfigError  # noqa: E402
from mm_jax.models.multimodel import MultiModel, TaskSignature  # noqa: E402

SIGNATURE = TaskSignature("language", "language")


def _model(remat: str) -> MultiModel:
  config = short_kernels.apply(get_config("tiny"))
  config.model.remat = remat
  return MultiModel(run.model_config(config.model, "cpu"))


def _batch():
  rng = np.random.default_rng(0)
  ids = lambda length: rng.integers(3, 256, (4, length)).astype(np.int32)
  inputs, targets = ids(12), ids(9)
  inputs[1, 7:] = 0  # padding: the encoder's masks and the MoE's routing see it
  targets[2, 5:] = 0
  return {"inputs": inputs, "targets": targets, "target_space": np.arange(4, dtype=np.int32) % 5}


def _grads(remat: str, params, batch):
  model = _model(remat)

  def loss(params):
    logits, aux = model.apply(
      {"params": params}, batch, SIGNATURE, train=True, rngs={"gating": jax.random.key(1)}
    )
    weights = jnp.sin(jnp.arange(logits.size, dtype=jnp.float32)).reshape(logits.shape)
    return jnp.sum(logits * weights) + aux

  return jax.jit(jax.grad(loss))(params)


@pytest.fixture(scope="module")
def reference():
  batch = _batch()
  params = jax.jit(
    lambda key: _model("none").init({"params": key}, batch, SIGNATURE, train=False)["params"]
  )(jax.random.key(0))
  return params, batch, _grads("none", params, batch)


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_gradients_with_remat_equal_those_without(remat, reference):
  params, batch, expected = reference
  got = _grads(remat, params, batch)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  # Recomputed activations may be fused and summed in another order: float32 rounding, relative
  # to each gradient's largest entry.
  leaves = zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(expected))
  for (path, g), e in leaves:
    scale = float(np.max(np.abs(e))) or 1.0
    np.testing.assert_allclose(
      g, e, rtol=1e-4, atol=2e-5 * scale, err_msg=jax.tree_util.keystr(path)
    )


def test_unknown_remat_is_a_config_error():
  config = get_config("tiny")
  config.model.remat = "full"
  with pytest.raises(ConfigError, match=r"config\.model\.remat='full': use one of") as info:
    validation.validate(config, num_devices=1, check_data=False)
  assert "\n" not in str(info.value)
