"""masked_max_pool against a float64 NumPy loop over windows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm_jax.models.modalities import masked_max_pool


def real_window(mask, n, i, j, kernel, strides):
  """Real (r, q) of output (i, j)'s window: input i*s - (k-1)//2 ... i*s + k//2 per axis."""
  _, h, w = mask.shape
  rows = range(i * strides[0] - (kernel[0] - 1) // 2, i * strides[0] + kernel[0] // 2 + 1)
  cols = range(j * strides[1] - (kernel[1] - 1) // 2, j * strides[1] + kernel[1] // 2 + 1)
  return [(r, q) for r in rows for q in cols if 0 <= r < h and 0 <= q < w and mask[n, r, q] > 0]


def reference_pool(x, mask, kernel, strides):
  b, h, w, c = x.shape
  out = np.zeros((b, -(-h // strides[0]), -(-w // strides[1]), c))
  for n, i, j in np.ndindex(out.shape[:3]):
    real = [x[n, r, q] for r, q in real_window(mask, n, i, j, kernel, strides)]
    if real and mask[n, i * strides[0], j * strides[1]] > 0:  # the centre must be real too
      out[n, i, j] = np.max(real, axis=0)
  return out


@pytest.mark.parametrize("shape,strides", [((2, 9, 7, 3), (2, 1)), ((2, 8, 8, 2), (2, 2))])
def test_masked_max_pool_matches_reference(shape, strides):
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape)
  mask = (rng.random(shape[:3]) > 0.3).astype(np.float64)
  y, out_mask = masked_max_pool(jnp.asarray(x, jnp.float32), jnp.asarray(mask), (3, 3), strides)
  np.testing.assert_allclose(y, reference_pool(x, mask, (3, 3), strides), atol=1e-6)
  np.testing.assert_array_equal(out_mask, mask[:, :: strides[0], :: strides[1]])


def test_masked_max_pool_gradient_reaches_only_the_maxima():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 6, 6, 1)), jnp.float32)
  grad = jax.grad(lambda v: masked_max_pool(v, None, (3, 3), (2, 2))[0].sum())(x)
  y, _ = masked_max_pool(x, None, (3, 3), (2, 2))
  # Each of the 9 outputs sends gradient 1 to its argmax (distinct random values: no ties).
  assert float(grad.sum()) == pytest.approx(float(y.size))
  assert set(np.asarray(x)[np.asarray(grad) > 0].tolist()) == set(np.asarray(y).ravel().tolist())


def reference_pool_gradient(x, mask, kernel, strides, weights):
  """d sum(pool(x) * weights) / dx: each real window's weight lands on its argmax position."""
  grad = np.zeros_like(x)
  for n, i, j, c in np.ndindex(*weights.shape):
    if mask[n, i * strides[0], j * strides[1]] == 0:
      continue
    real = real_window(mask, n, i, j, kernel, strides)
    r, q = max(real, key=lambda rq: x[n, rq[0], rq[1], c])
    grad[n, r, q, c] += weights[n, i, j, c]
  return grad


@pytest.mark.parametrize("shape,strides", [((2, 9, 7, 3), (2, 1)), ((2, 8, 8, 2), (2, 2))])
def test_masked_max_pool_gradient_matches_reference(shape, strides):
  rng = np.random.default_rng(2)
  x = rng.normal(size=shape)
  mask = (rng.random(shape[:3]) > 0.3).astype(np.float64)
  out_shape = (shape[0], -(-shape[1] // strides[0]), -(-shape[2] // strides[1]), shape[3])
  weights = rng.normal(size=out_shape)

  def objective(v):
    y, _ = masked_max_pool(v, jnp.asarray(mask), (3, 3), strides)
    return (y * jnp.asarray(weights, jnp.float32)).sum()

  grad = jax.grad(objective)(jnp.asarray(x, jnp.float32))
  expected = reference_pool_gradient(x, mask, (3, 3), strides, weights)
  np.testing.assert_allclose(grad, expected, atol=1e-5)
