"""The body's building blocks: separable convolutions, ConvStep, ConvBlock and attention.

Sequences are [batch, length, channels]; modality nets reuse the same pieces on 2-D grids
[batch, height, width, channels]. Padding is either "same" (encoder: sees both sides, with padded
positions zeroed first so that appended padding never changes real positions) or "causal" (mixer and
decoder: padded on the left only, so no position sees the future).

Incremental decoding (`decode=True`) runs the causal pieces one position at a time: each causal
conv keeps its last (kernel - 1) * dilation inputs in the "cache" collection, and attention keeps
the memory's keys, values and mask bias in the "memory" collection (computed on the first call).
The first call only creates these variables; later calls read and advance them.
"""

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The kernel forms a model is built with (config.model.kernels, which run.build resolves from
# "auto" to one of these for the run's devices):
#   "cpu": forms written for XLA:CPU: Dense's backward written out (dense_dot) and the depthwise
#          conv as K shifted slices multiplied and summed, with its backward written out; on CPU
#          they beat XLA's own forms (bench/model.py measures both depthwise forms).
#   "xla": the plain forms, left to XLA's autodiff and emitters (GPU): Dense as one dot,
#          the depthwise conv as one grouped conv_general_dilated (packed: the shifted slices
#          under autodiff, depthwise_taps).
#   "tpu": Dense as one plain dot, the depthwise conv shifted. A grouped conv fills a TPU vector
#          register's 128 lanes an eighth full over the audio net's 16 channels, and even at the
#          body's width the TPU compiler estimates an encoder ConvBlock shorter shifted than
#          grouped or under autodiff, packed by about a fifth (bench/results/tpu_parts.md).
# Every form but "cpu" also takes LayerNorm's variance in one pass (LayerNorm).
KERNELS = ("cpu", "xla", "tpu")


def depthwise_form(kernels: str) -> str:
  """The key of DEPTHWISE a (not packed) depthwise conv takes in form `kernels`."""
  return "grouped" if check_kernels(kernels) == "xla" else "shifted"


EMBED_AXES = ("batch", "length", "embed")


def whole_at_use(weight, keep: tuple[str | None, ...] | None = None):
  """`weight` constrained whole (or split only by the logical names in `keep`) where it is
  used: a parameter stored split over the data-parallel devices (fsdp) is gathered for the
  computation, never the activations it meets."""
  return nn.with_logical_constraint(weight, keep or (None,) * weight.ndim)


def _spatial_names(ndim: int) -> tuple[str, ...]:
  return ("conv_kernel",) if ndim == 1 else ("height", "width")


def conv_padding(kernel: int, dilation: int, padding: str) -> tuple[int, int]:
  """(left, right) zeros for one spatial axis so that output length equals input length."""
  total = (kernel - 1) * dilation
  if padding == "causal":
    return total, 0
  if padding == "same":
    return total // 2, total - total // 2
  raise ValueError(f"padding={padding!r}: use 'same' or 'causal'")


def _tap_offsets(kernel_shape, dilation):
  """(tap index, its offset along each spatial axis) for every kernel tap."""
  for tap in np.ndindex(*kernel_shape):
    yield tap, [t * r for t, r in zip(tap, dilation)]


def _tap_windows(padded, kernel_shape, dilation, spatial):
  """(tap index, the slice of `padded` that tap multiplies) for every kernel tap."""
  sizes = (padded.shape[0], *spatial, padded.shape[-1])
  for tap, offsets in _tap_offsets(kernel_shape, dilation):
    start = [0, *offsets, 0]
    yield tap, jax.lax.slice(padded, start, [s + n for s, n in zip(start, sizes)])


def _tap_masks(kernel_shape, dilation, pads, packing):
  """Per tap: None, or a [1, tokens, 1] constant zeroing the outputs whose tap would read a
  neighbouring packed sequence (1-D only; without packing every tap is None)."""
  taps = list(_tap_offsets(kernel_shape, dilation))
  if packing is None:
    return [None] * len(taps)
  left = pads[0][0]
  masks = []
  for _, (offset,) in taps:
    valid = packing.tap_valid(offset - left)
    masks.append(None if valid is None else valid[None, :, None])
  return masks


def _masked(x, mask):
  return x if mask is None else x * jnp.asarray(mask, x.dtype)


def _shifted_sum(x, kernel, dilation, pads, packing=None):
  padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  # "Valid" output size of the padded input (the input's own size under same/causal pads).
  spatial = [n - (k - 1) * r for n, k, r in zip(padded.shape[1:-1], kernel.shape[:-1], dilation)]
  masks = _tap_masks(kernel.shape[:-1], dilation, pads, packing)
  windows = _tap_windows(padded, kernel.shape[:-1], dilation, spatial)
  terms = (_masked(w * kernel[tap], m) for (tap, w), m in zip(windows, masks))
  return functools.reduce(jnp.add, terms)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise_shifted(x, kernel, dilation, pads, packing):
  return _shifted_sum(x, kernel, dilation, pads, packing)


def _depthwise_fwd(x, kernel, dilation, pads, packing):
  return _shifted_sum(x, kernel, dilation, pads, packing), (x, kernel)


def _depthwise_bwd(dilation, pads, packing, saved, grad):
  """Input gradient = the same conv of the gradient with flipped taps and swapped pads.

  Autodiff would give one pad per tap plus one reduction per tap, each re-fusing the gradient's
  producers; materialising the gradient once (the barrier) keeps the backward a few fusions.
  Each tap's kernel gradient multiplies the padded input by the gradient shifted to that tap:
  shifting the input instead made XLA materialise every tap's window of it first, which on the
  audio net's grids was 3.5x slower (measured: 3x3 taps on [32, 240, 40, 16], fwd+bwd alone).
  Packed, a masked tap passes back only its unmasked outputs' gradient.
  """
  x, kernel = saved
  grad = jax.lax.optimization_barrier(grad)
  spatial_axes = tuple(range(kernel.ndim - 1))
  swapped = [(hi, lo) for lo, hi in pads]
  # Packed, the flipped taps get the masks of the opposite offsets: the same (symmetric) test.
  dx = _shifted_sum(grad, jnp.flip(kernel, spatial_axes), dilation, swapped, packing)
  padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  reduce_axes = tuple(range(x.ndim - 1))
  masks = _tap_masks(kernel.shape[:-1], dilation, pads, packing)
  dkernel = []
  for (_, offsets), mask in zip(_tap_offsets(kernel.shape[:-1], dilation), masks):
    shift = [(o, p - n - o) for o, p, n in zip(offsets, padded.shape[1:-1], grad.shape[1:-1])]
    shifted = jnp.pad(grad, ((0, 0), *shift, (0, 0)))
    if mask is not None:  # shifted with the gradient; masking the gradient first costs a copy
      mask = np.pad(mask, ((0, 0), *shift, (0, 0)))
    # Summed over every token in float32, whatever the activations' dtype.
    dkernel.append(_masked(shifted * padded, mask).sum(reduce_axes, dtype=jnp.float32))
  return dx, jnp.stack(dkernel).reshape(kernel.shape).astype(kernel.dtype)


_depthwise_shifted.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_shifted(
  x, kernel, dilation: Sequence[int], pads: Sequence[tuple[int, int]], packing=None
):
  """Depthwise conv as a sum of shifted slices times per-channel taps (memory-bound, no im2col)."""
  return _depthwise_shifted(x, kernel, tuple(dilation), tuple(tuple(p) for p in pads), packing)


def depthwise_taps(
  x, kernel, dilation: Sequence[int], pads: Sequence[tuple[int, int]], packing=None
):
  """The shifted slices' sum under XLA's own autodiff: the plain form of a packed conv, whose
  masked taps no grouped convolution expresses."""
  return _shifted_sum(x, kernel, tuple(dilation), tuple(tuple(p) for p in pads), packing)


def depthwise_grouped(x, kernel, dilation: Sequence[int], pads: Sequence[tuple[int, int]]):
  """Depthwise conv through XLA's grouped convolution (one group per channel)."""
  channels = x.shape[-1]
  spatial = "HW"[: x.ndim - 2] if x.ndim == 4 else "H"
  dn = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
  return jax.lax.conv_general_dilated(
    x,
    kernel[..., None, :],
    window_strides=(1,) * (x.ndim - 2),
    padding=tuple(pads),
    rhs_dilation=tuple(dilation),
    dimension_numbers=dn,
    feature_group_count=channels,
  )


DEPTHWISE = {"shifted": depthwise_shifted, "grouped": depthwise_grouped}


def zero_padding(x, mask):
  """Zeros padded positions; mask is [batch, *spatial] (1 = real) or None."""
  return x if mask is None else x * mask[..., None].astype(x.dtype)


class LayerNorm(nn.Module):
  """LayerNorm over channels with float32 statistics, parameters named for the sharding rules.

  `kernels` (KERNELS) picks how the variance is taken. "cpu": as the mean of (x - mean)^2, a
  second pass over x. The others: as E[x^2] - E[x]^2, both means from one pass, as flax's own
  LayerNorm does by default: one read of every activation fewer, forward and backward, where the
  body's memory-bound passes bound its speed (docs/performance.md). The one-pass form rounds a
  little more where a channel's mean is large against its spread, which is why the CPU forms
  that tests compare runs with keep the two-pass one.
  """

  axis_name: str = "embed"
  epsilon: float = 1e-6
  kernels: str = "cpu"

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param(
      "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)), (c,)
    )
    bias = self.param(
      "bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)), (c,)
    )
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    if check_kernels(self.kernels) == "cpu":
      var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    else:
      var = jnp.maximum(jnp.square(x32).mean(-1, keepdims=True) - jnp.square(mean), 0.0)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(x.dtype)


@jax.custom_vjp
def dense_dot(x, w):
  """x @ w over x's last axis; the backward is written out for XLA:CPU (see _dense_dot_bwd)."""
  return jnp.dot(x, w)


def _dense_dot_fwd(x, w):
  return jnp.dot(x, w), (x, w)


def _dense_dot_bwd(saved, grad):
  """dx = grad @ w.T; dw = x.T @ grad over the tokens flattened to one axis, grad materialised.

  Autodiff's weight gradient contracts the tokens' axes of x and grad as they are, and XLA:CPU
  then writes grad transposed inside the fusion that produces it (a LayerNorm's backward, reading
  its inputs across the grain) and runs the dot on its own emitter. With one token axis, and grad
  kept out of that fusion, those copies and dots shrink to about a sixth and a half, and the
  default step takes about 0.9x as long (docs/performance.md).
  """
  x, w = saved
  dx = jnp.dot(grad, w.T)
  grad = jax.lax.optimization_barrier(grad)
  dw = jnp.dot(x.reshape(-1, x.shape[-1]).T, grad.reshape(-1, grad.shape[-1]))
  return dx, dw


dense_dot.defvjp(_dense_dot_fwd, _dense_dot_bwd)


def check_kernels(kernels: str) -> str:
  """`kernels`, if it names a form (KERNELS); else a ValueError (an unresolved "auto" included)."""
  if kernels not in KERNELS:
    raise ValueError(f"kernels={kernels!r}: use one of {KERNELS} (run.build resolves 'auto')")
  return kernels


class Dense(nn.Module):
  """x @ W over the last axis, with logical names for the kernel's two axes.

  `kernels` (KERNELS): "cpu" multiplies through dense_dot, the others through a plain jnp.dot.
  """

  features: int
  axes: tuple[str, str] = ("embed", "mlp")
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  kernels: str = "cpu"

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal()
    w = self.param(
      "kernel", nn.with_logical_partitioning(init, self.axes), (x.shape[-1], self.features)
    )
    dot = dense_dot if check_kernels(self.kernels) == "cpu" else jnp.dot
    y = dot(x.astype(self.dtype), w.astype(self.dtype))
    if self.use_bias:
      b = self.param(
        "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]), (self.features,)
      )
      y = y + b.astype(self.dtype)
    return y


class SeparableConv(nn.Module):
  """Depthwise conv (per channel, dilated) followed by a pointwise projection to `features`.

  `kernels` (KERNELS) picks the depthwise form (depthwise_form) and the projection's (Dense).
  """

  features: int
  kernel_size: tuple[int, ...]
  dilation: tuple[int, ...] | None = None
  padding: str = "same"
  channel_name: str = "embed"
  dtype: jnp.dtype = jnp.float32
  kernels: str = "cpu"

  @nn.compact
  def __call__(self, x, *, decode: bool = False, packing=None):
    """`packing` (packing.Packing, 1-D only): x holds packed sequences; no tap crosses one."""
    dilation = self.dilation or (1,) * len(self.kernel_size)
    names = (*_spatial_names(len(self.kernel_size)), self.channel_name)
    fan_in = math.prod(self.kernel_size)
    taps = self.param(
      "depthwise",
      nn.with_logical_partitioning(nn.initializers.normal(fan_in**-0.5), names),
      (*self.kernel_size, x.shape[-1]),
    )
    # Used whole wherever the rules store it split (fsdp): left split along the channels it
    # shares with x, the TPU compiler gathered x's batch instead, for the taps' gradient.
    taps = whole_at_use(taps)
    pads = [conv_padding(k, r, self.padding) for k, r in zip(self.kernel_size, dilation)]
    x = x.astype(self.dtype)
    if decode:
      x = self._with_history(x, dilation)
      pads = [(0, 0)]  # the history is exactly the causal left padding
    if packing is None:
      y = DEPTHWISE[depthwise_form(self.kernels)](x, taps.astype(self.dtype), dilation, pads)
    else:
      packed = depthwise_taps if depthwise_form(self.kernels) == "grouped" else depthwise_shifted
      y = packed(x, taps.astype(self.dtype), dilation, pads, packing)
    return Dense(
      self.features,
      (self.channel_name, "mlp"),
      dtype=self.dtype,
      kernels=self.kernels,
      name="pointwise",
    )(y)

  def _with_history(self, x, dilation):
    """x [B, n, C] preceded by the inputs this conv saw last; the history then advances by n."""
    if self.padding != "causal" or len(self.kernel_size) != 1:
      raise ValueError("incremental decoding needs a 1-D causal conv")
    history = (self.kernel_size[0] - 1) * dilation[0]
    if history == 0:
      return x
    started = self.has_variable("cache", "inputs")
    cache = self.variable(
      "cache", "inputs", jnp.zeros, (x.shape[0], history, x.shape[-1]), x.dtype
    )  # zeros = the causal padding before position 0
    window = jnp.concatenate([cache.value, x], axis=1)
    window = nn.with_logical_constraint(window, ("batch", "length", self.channel_name))
    if started:
      cache.value = window[:, -history:]
    return window


class ConvStep(nn.Module):
  """ReLU -> separable conv -> LayerNorm; padded positions are zeroed before the conv."""

  features: int
  kernel_size: tuple[int, ...]
  dilation: tuple[int, ...] | None = None
  padding: str = "same"
  first_relu: bool = True
  channel_name: str = "embed"
  dtype: jnp.dtype = jnp.float32
  kernels: str = "cpu"

  @nn.compact
  def __call__(self, x, mask=None, *, decode: bool = False, packing=None):
    if self.first_relu:
      x = nn.relu(x)
    x = zero_padding(x, mask)
    x = SeparableConv(
      self.features,
      self.kernel_size,
      self.dilation,
      self.padding,
      self.channel_name,
      self.dtype,
      self.kernels,
      name="conv",
    )(x, decode=decode, packing=packing)
    return LayerNorm(self.channel_name, kernels=self.kernels, name="norm")(x)


def residual(x, y, dropout: float, train: bool, kernels: str, name: str):
  """LayerNorm(x + dropout(y)): every residual branch in the body joins the stream this way."""
  y = nn.Dropout(dropout, deterministic=not train)(y)
  return LayerNorm(kernels=kernels, name=name)(x + y)


class ConvBlock(nn.Module):
  """Two residual groups of 1-D ConvSteps; each group is a list of (kernel, dilation) pairs."""

  groups: tuple[tuple[tuple[int, int], ...], ...]
  padding: str = "same"
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  kernels: str = "cpu"

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool = False, decode: bool = False, packing=None):
    d = x.shape[-1]
    for g, group in enumerate(self.groups):
      y = x
      for s, (kernel, dilation) in enumerate(group):
        y = ConvStep(
          d,
          (kernel,),
          (dilation,),
          self.padding,
          dtype=self.dtype,
          kernels=self.kernels,
          name=f"group{g}_step{s}",
        )(y, mask, decode=decode, packing=packing)
      x = residual(x, y, self.dropout, train, self.kernels, f"group{g}_norm")
      x = nn.with_logical_constraint(x, EMBED_AXES)
    return x


@functools.lru_cache(maxsize=64)
def _timing_signal(length: int, channels: int, max_timescale: float = 1.0e4) -> np.ndarray:
  half = channels // 2
  log_increment = math.log(max_timescale) / max(half - 1, 1)
  inv = np.exp(-log_increment * np.arange(half, dtype=np.float64))
  scaled = np.arange(length, dtype=np.float64)[:, None] * inv[None, :]
  signal = np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1)
  return np.pad(signal, ((0, 0), (0, channels - 2 * half))).astype(np.float32)


def add_timing_signal(x, packing=None):
  """Adds the sinusoid position signal (a trace-time constant) to [batch, length, channels];
  packed, each sequence gets the signal of its own positions."""
  if packing is None:
    return x + jnp.asarray(_timing_signal(x.shape[1], x.shape[2]), x.dtype)
  longest = max(length for _, length in packing.segments)
  return x + jnp.asarray(_timing_signal(longest, x.shape[2])[packing.positions()], x.dtype)


def timing_signal_at(position, max_length: int, channels: int):
  """Row `position` (traced) of the timing signal, [channels]: the same float32 values that
  add_timing_signal adds at that position."""
  return jnp.asarray(_timing_signal(max_length, channels))[position]


def _mask_bias(memory_mask):
  """[B, M] (1 = real) -> [B, 1, 1, M] additive float32 bias that hides padded keys."""
  return jnp.where(memory_mask[:, None, None, :] > 0, 0.0, -1e9).astype(jnp.float32)


def _attend(q, k, v, bias, dtype):
  """Softmax(q k + bias) v over [B, length, heads, head] queries and keys; float32 softmax."""
  logits = jnp.einsum("bqhk,bmhk->bhqm", q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits + bias, axis=-1).astype(dtype)
  return jnp.einsum("bhqm,bmhk->bqhk", weights, v)


class MultiHeadAttention(nn.Module):
  """Dot-product attention from queries to a memory, float32 softmax, padded keys masked."""

  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, queries, memory, memory_mask, *, decode: bool = False, packing=None):
    """`packing`: (the queries' Packing, the memory's), group for group; each group's queries
    then attend only to their own examples' memory."""
    d = queries.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"model.d={d} must divide by model.num_heads={self.num_heads}")
    head = d // self.num_heads
    init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))

    def proj(name, x):
      w = self.param(
        name,
        nn.with_logical_partitioning(init, ("embed", "heads", "kv")),
        (d, self.num_heads, head),
      )
      return jnp.einsum("bld,dhk->blhk", x.astype(self.dtype), w.astype(self.dtype))

    q = proj("query", queries) * head**-0.5
    if decode and self.has_variable("memory", "key"):
      k, v, bias = (self.get_variable("memory", n) for n in ("key", "value", "bias"))
    else:
      k = proj("key", memory)
      v = proj("value", memory)
      bias = _mask_bias(memory_mask)
      if decode:  # the memory is fixed while decoding: project it once
        for name, value in (("key", k), ("value", v), ("bias", bias)):
          self.put_variable("memory", name, value)
    if packing is None:
      out = _attend(q, k, v, bias, self.dtype)
    else:
      queries_packing, memory_packing = packing
      memory_parts = (memory_packing.unpack(a) for a in (k, v, memory_mask))
      groups = zip(queries_packing.unpack(q), *memory_parts)
      out = queries_packing.pack(
        [_attend(qg, kg, vg, _mask_bias(mg), self.dtype) for qg, kg, vg, mg in groups]
      )
    w_out = self.param(
      "out",
      nn.with_logical_partitioning(
        nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2), ("heads", "kv", "embed")
      ),
      (self.num_heads, head, d),
    )
    return jnp.einsum("bqhk,hkd->bqd", out, w_out.astype(self.dtype))


def queries_packing(packing):
  """The queries' side of an attention `packing` pair (None when nothing is packed)."""
  return None if packing is None else packing[0]


class AttentionBlock(nn.Module):
  """LayerNorm(x + attention(queries(x), memory)); queries come from causal convs of x + timing.

  The query convs only look left, so the block keeps the decoder causal; the memory is the
  encoder output, which any target position may see in full.
  """

  num_heads: int
  query_convs: tuple[tuple[int, int], ...] = ((5, 1), (5, 4))
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  kernels: str = "cpu"

  @nn.compact
  def __call__(self, x, memory, memory_mask, *, train: bool = False, timing=None, packing=None):
    """`timing`: None for whole sequences; when decoding one position, its timing-signal row.
    `packing`: (x's Packing, memory's Packing) when both hold packed groups."""
    d = x.shape[-1]
    decode = timing is not None
    x_packing = queries_packing(packing)
    q = x + timing.astype(x.dtype) if decode else add_timing_signal(x, x_packing)
    for s, (kernel, dilation) in enumerate(self.query_convs):
      q = ConvStep(
        d,
        (kernel,),
        (dilation,),
        "causal",
        dtype=self.dtype,
        kernels=self.kernels,
        name=f"query_step{s}",
      )(q, decode=decode, packing=x_packing)
    y = MultiHeadAttention(self.num_heads, self.dtype, name="attention")(
      q, memory, memory_mask, decode=decode, packing=packing
    )
    x = residual(x, y, self.dropout, train, self.kernels, "norm")
    return nn.with_logical_constraint(x, EMBED_AXES)
