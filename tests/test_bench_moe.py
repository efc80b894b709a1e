"""bench/moe.py's dropless rows swap the experts' grouped matmuls: the swapped-in form must compute
what a float64 NumPy loop over the experts computes, and the layer must not change with it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bench import moe as moe_bench
from mm_jax.models import moe as moe_lib


def _numpy_ffn(rows, group_sizes, w_in, w_out):
  """Expert by expert in float64: each run of rows through its expert; rows past the runs give 0."""
  rows, w_in, w_out = (np.asarray(a, np.float64) for a in (rows, w_in, w_out))
  out = np.zeros((rows.shape[0], w_out.shape[-1]))
  start = 0
  for expert, size in enumerate(np.asarray(group_sizes)):
    part = rows[start : start + size]
    out[start : start + size] = np.maximum(part @ w_in[expert], 0) @ w_out[expert]
    start += size
  return out


def test_ragged_ffn_matches_a_float64_loop_over_the_experts():
  key = jax.random.split(jax.random.key(0), 3)
  rows = jax.random.normal(key[0], (23, 8), jnp.float32)
  w_in = jax.random.normal(key[1], (4, 8, 16), jnp.float32)
  w_out = jax.random.normal(key[2], (4, 16, 8), jnp.float32)
  group_sizes = jnp.array([5, 0, 9, 6], jnp.int32)  # 3 rows left over: masked tokens
  ffn = moe_bench.ragged_ffn(moe_bench.ragged_dots()["xla"])
  got = np.asarray(jax.jit(ffn, static_argnums=4)(rows, group_sizes, w_in, w_out, ()))
  want = _numpy_ffn(rows, group_sizes, w_in, w_out)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  assert np.all(got[20:] == 0) and np.abs(want[:20]).max() > 1


def test_a_swapped_in_ragged_dot_leaves_the_dropless_layer_unchanged():
  """A grouped matmul written another way (one dense matmul per expert, rows masked to its run)
  gives the layer's values and gradients; the swap is undone afterwards."""

  def masked_dot(lhs, rhs, group_sizes):
    ends = jnp.cumsum(group_sizes)
    row = jnp.arange(lhs.shape[0])[:, None]
    inside = (row >= (ends - group_sizes)[None, :]) & (row < ends[None, :])  # [m, g]
    return jnp.einsum("mg,mk,gkn->mn", inside.astype(lhs.dtype), lhs, rhs)

  layer = moe_lib.MoE(num_experts=4, k=2, hidden=16, group_size=32, dispatch="dropless")
  x = jax.random.normal(jax.random.key(1), (2, 16, 8), jnp.float32)
  params = nn.unbox(layer.init(jax.random.key(2), x, None)["params"])

  def value_and_grad():
    def loss(params, x):
      y, aux = layer.apply(
        {"params": params}, x, None, train=True, rngs={"gating": jax.random.key(3)}
      )
      return jnp.sum(jnp.sin(y)) + aux

    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

  original = moe_lib._ffn_ragged
  reference = value_and_grad()
  moe_lib._ffn_ragged = moe_bench.ragged_ffn(masked_dot)
  try:
    swapped = value_and_grad()
  finally:
    moe_lib._ffn_ragged = original
  for got, want in zip(jax.tree.leaves(swapped), jax.tree.leaves(reference), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(reference[1][0]["w_in"]).max()) > 0  # the experts got gradients
