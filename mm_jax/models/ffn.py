"""Dense feed-forward layer with the MoE layer's interface (the paper's "without MoE" ablation).

Both layers are called as `y, aux_loss = layer(x, mask, train=...)`, so the body picks one by
config and never branches on which it got.
"""

import flax.linen as nn
import jax.numpy as jnp


class DenseFFN(nn.Module):
  """ReLU feed-forward net d -> hidden -> d; its auxiliary loss is always zero."""

  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool = False, tasks=None):
    del mask, train, tasks  # Position-wise: padding cannot leak, no noise, nothing routed.
    d = x.shape[-1]
    init = nn.initializers.lecun_normal()
    w_in = self.param(
      "w_in", nn.with_logical_partitioning(init, ("embed", "mlp")), (d, self.hidden)
    )
    w_out = self.param(
      "w_out", nn.with_logical_partitioning(init, ("mlp", "embed")), (self.hidden, d)
    )
    h = nn.relu(jnp.einsum("bld,dh->blh", x.astype(self.dtype), w_in.astype(self.dtype)))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    y = jnp.einsum("blh,hd->bld", h, w_out.astype(self.dtype))
    return y, jnp.zeros((), jnp.float32)
