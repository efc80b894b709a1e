"""config.optimizer.flatten: the per-leaf optimizer's updates, from one vector of state."""

import jax
import numpy as np
import pytest

from configs import multimodel as multimodel_config  # noqa: E402
from mm_jax import optimizer  # noqa: E402


def _tree(rng, scale=1.0):
  return {
    "a": {"w": scale * rng.standard_normal((5, 3)), "b": scale * rng.standard_normal(3)},
    "c": scale * rng.standard_normal((2, 4, 6)),
  }


@pytest.mark.parametrize("grad_scale", [0.1, 100.0], ids=["unclipped", "clipped"])
def test_flat_updates_equal_per_leaf_updates(grad_scale):
  opt_config = multimodel_config.get_config("tiny").optimizer
  rng = np.random.default_rng(0)
  params = jax.tree.map(np.float32, _tree(rng))
  grads = [jax.tree.map(np.float32, _tree(rng, grad_scale)) for _ in range(3)]
  results = {}
  for flat in (False, True):
    opt_config.flatten = flat
    tx = optimizer.make_optimizer(opt_config, num_steps=10)
    state, p, norms = tx.init(params), params, []
    for g in grads:
      updates, state = jax.jit(tx.update)(g, state, p)
      p = jax.tree.map(lambda x, u: x + u, p, updates)
      norms.append(float(optimizer.global_norm(g, flat)))
    results[flat] = p, state, norms
  per_leaf, flat = results[False], results[True]
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), flat[0], per_leaf[0]
  )
  # Independent of both: the norm by hand in float64.
  want = [np.sqrt(sum(np.sum(np.float64(x) ** 2) for x in jax.tree.leaves(g))) for g in grads]
  np.testing.assert_allclose(flat[2], want, rtol=1e-6)
  np.testing.assert_allclose(per_leaf[2], want, rtol=1e-6)
  # The flat state holds each moment as one vector of every parameter.
  size = sum(x.size for x in jax.tree.leaves(params))
  vectors = [x for x in jax.tree.leaves(flat[1]) if np.ndim(x) == 1]
  assert vectors and all(x.shape == (size,) for x in vectors)
  assert len(jax.tree.leaves(flat[1])) < len(jax.tree.leaves(per_leaf[1]))
