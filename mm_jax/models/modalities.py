"""Modality nets: map each kind of input into the body's [batch, length, d] and body outputs back.

Strided convs and pools pad by a fixed amount on each side (not TF's length-dependent "SAME"), so a
position's window never depends on how much padding follows the sequence; padded frames are zeroed
before every conv and excluded from every max-pool and average, which keeps real positions unchanged
when padding is appended.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm_jax.models.blocks import (
  EMBED_AXES,
  ConvStep,
  Dense,
  LayerNorm,
  whole_at_use,
  zero_padding,
)

GRID_AXES = ("batch", "height", "width", "channels")


def strided_mask(mask, strides):
  """Mask of a strided output: position i is real when the input at its window centre i*s is."""
  if mask is None:
    return None
  return mask[(slice(None), *(slice(None, None, s) for s in strides))]


def _window_pads(kernel):
  """Fixed (left, right) pads for any stride s: ceil(n / s) outputs, window i centred on i * s."""
  return tuple(((k - 1) // 2, k // 2) for k in kernel)


def _max_along(x, axis, kernel, stride):
  """Max over `kernel` taps along one (already padded) axis, every `stride`-th window."""
  outputs = -(-(x.shape[axis] - kernel + 1) // stride)
  taps = []
  for t in range(kernel):
    index = [slice(None)] * x.ndim
    index[axis] = slice(t, t + stride * (outputs - 1) + 1, stride)
    taps.append(x[tuple(index)])
  return functools.reduce(jnp.maximum, taps)


def masked_max_pool(x, mask, kernel, strides):
  """Max-pool over spatial axes where padded positions (and the border) count as -inf.

  A rectangular window's max is the max along one axis of the max along the other, so each axis
  takes a few strided shifted slices. Not reduce_window: on CPU its backward (select-and-scatter)
  made the audio net's train step about 1.5x slower. Nor one maximum over all k*k taps: XLA
  re-derives that chain's running maxima for every tap of its backward (k*k*k*k work per input
  for a k*k window; per axis it is k*k): that took the default train step from 1.89 to 2.38 s.
  """
  if mask is not None:
    x = jnp.where(mask[..., None] > 0, x, -jnp.inf)
  y = jnp.pad(x, ((0, 0), *_window_pads(kernel), (0, 0)), constant_values=-jnp.inf)
  for axis, (k, s) in enumerate(zip(kernel, strides), start=1):
    y = _max_along(y, axis, k, s)
  out_mask = strided_mask(mask, strides)
  # Windows with no real position (only at padded outputs) would be -inf: make them 0.
  return zero_padding(jnp.where(jnp.isfinite(y), y, 0.0), out_mask), out_mask


class Conv(nn.Module):
  """A full (not separable) conv over a grid, for the stems where channels are few."""

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal()
    w = self.param(
      "kernel",
      nn.with_logical_partitioning(init, ("height", "width", "channels", "mlp")),
      (*self.kernel_size, x.shape[-1], self.features),
    )
    w = whole_at_use(w, (None, None, None, "mlp"))
    return jax.lax.conv_general_dilated(
      x.astype(self.dtype),
      w.astype(self.dtype),
      self.strides,
      _window_pads(self.kernel_size),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


class ConvNorm(nn.Module):
  """[ReLU ->] full conv -> LayerNorm (the stems and the 1x1 residual projections)."""

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  first_relu: bool = True
  dtype: jnp.dtype = jnp.float32
  kernels: str = "cpu"  # blocks.KERNELS: the 1x1 conv's Dense form and the LayerNorm's

  @nn.compact
  def __call__(self, x, mask=None):
    if self.first_relu:
      x = nn.relu(x)
    x = zero_padding(x, mask)
    if self.kernel_size == (1, 1):  # A strided 1x1 conv is a slice and a matmul.
      x = x[:, :: self.strides[0], :: self.strides[1]]
      y = Dense(
        self.features, ("channels", "mlp"), dtype=self.dtype, kernels=self.kernels, name="conv"
      )(x)
    else:
      y = Conv(self.features, self.kernel_size, self.strides, self.dtype, name="conv")(x)
    return LayerNorm("channels", kernels=self.kernels, name="norm")(y)


class XceptionBlock(nn.Module):
  """[ReLU -> separable 3x3 -> LayerNorm] x 2 -> max-pool 3x3 stride s, plus a 1x1 stride-s skip."""

  features: int
  strides: tuple[int, int]
  skip_relu: bool
  dtype: jnp.dtype = jnp.float32
  kernels: str = "cpu"

  @nn.compact
  def __call__(self, x, mask=None):
    kernel = (3, 3)
    y = x
    for s in range(2):
      y = ConvStep(
        self.features,
        kernel,
        channel_name="channels",
        dtype=self.dtype,
        kernels=self.kernels,
        name=f"step{s}",
      )(y, mask)
    y, out_mask = masked_max_pool(y, mask, kernel, self.strides)
    skip = ConvNorm(
      self.features, (1, 1), self.strides, self.skip_relu, self.dtype, self.kernels, name="skip"
    )(x, mask)
    out = nn.with_logical_constraint(y + skip, GRID_AXES)
    return zero_padding(out, out_mask), out_mask


def image_grid_size(size: int, strides: int = 4) -> int:
  """Side of the image net's output grid: each of the stem and 3 blocks halves it, rounding up."""
  for _ in range(strides):
    size = -(-size // 2)
  return size


class ImageModality(nn.Module):
  """Xception-like entry flow; the final grid is flattened into a sequence of positions."""

  d: int
  dtype: jnp.dtype = jnp.float32
  kernels: str = "cpu"

  @nn.compact
  def __call__(self, images):
    stem = functools.partial(ConvNorm, dtype=self.dtype, kernels=self.kernels)
    x = stem(32, (3, 3), (2, 2), first_relu=False, name="stem0")(images)
    x = stem(64, (3, 3), name="stem1")(x)
    widths = (min(128, self.d), min(256, self.d), self.d)
    for i, width in enumerate(widths):
      x, _ = XceptionBlock(width, (2, 2), i == 0, self.dtype, self.kernels, name=f"block{i}")(x)
    b, h, w, c = x.shape
    x = nn.with_logical_constraint(x.reshape(b, h * w, c), EMBED_AXES)
    return x, jnp.ones((b, h * w), jnp.float32)


def audio_widths(d: int, num_blocks: int) -> tuple[int, ...]:
  """Channel widths of the audio blocks: few channels, since frequency stays a spatial axis."""
  return tuple(min(d, 16 * 2**i) for i in range(num_blocks))


class AudioModality(nn.Module):
  """Log-mel frames -> residual blocks striding time by 2 (never frequency) -> [B, T', d].

  Frequency stays a spatial axis through the blocks and is folded into channels only at the end,
  where one projection maps (mel bins x channels) to d, so the body sees one position per
  strided frame instead of one per (frame, bin) pair. The stem may stride time too, as the image
  net's stem strides both axes: with few channels and every bin kept, the net's cost is its
  per-position LayerNorms and depthwise taps, and at full frame rate they took 42% of the default
  train step's kernel time (bench/profile_step.py).
  """

  d: int
  num_blocks: int
  stem_stride: int = 1  # along time
  dtype: jnp.dtype = jnp.float32
  kernels: str = "cpu"

  @nn.compact
  def __call__(self, frames, mask):
    # A full-conv stem first, as in the image net: a separable conv on one input channel is
    # rank one, and the LayerNorm after it would squash each position to little more than a sign.
    widths = audio_widths(self.d, self.num_blocks)
    strides = (self.stem_stride, 1)
    stem = ConvNorm(
      widths[0],
      (3, 3),
      strides,
      first_relu=False,
      dtype=self.dtype,
      kernels=self.kernels,
      name="stem",
    )
    x = stem(frames[..., None], mask[:, :, None])
    mask = strided_mask(mask, (self.stem_stride,))
    for i, width in enumerate(widths):
      x, mask = XceptionBlock(width, (2, 1), True, self.dtype, self.kernels, name=f"block{i}")(
        x, mask[:, :, None]
      )
      mask = mask[:, :, 0]
    b, t, f, c = x.shape
    x = Dense(
      self.d, ("channels", "embed"), dtype=self.dtype, kernels=self.kernels, name="project"
    )(x.reshape(b, t, f * c))
    x = zero_padding(LayerNorm(kernels=self.kernels, name="norm")(x), mask)
    return nn.with_logical_constraint(x, EMBED_AXES), mask


class LanguageModality(nn.Module):
  """Subword embedding x sqrt(d) in, dense projection to the shared vocabulary out (not tied)."""

  vocab_size: int
  d: int
  dtype: jnp.dtype = jnp.float32
  kernels: str = "cpu"

  def setup(self):
    self.embedding = self.param(
      "embedding",
      nn.with_logical_partitioning(nn.initializers.normal(self.d**-0.5), ("vocab", "embed")),
      (self.vocab_size, self.d),
    )
    self.softmax = Dense(
      self.vocab_size, ("embed", "vocab"), use_bias=True, kernels=self.kernels, name="softmax"
    )

  def embed(self, ids):
    x = jnp.take(self.embedding, ids, axis=0) * self.d**0.5
    x = zero_padding(x, (ids != 0).astype(jnp.float32)).astype(self.dtype)
    return nn.with_logical_constraint(x, EMBED_AXES)

  def logits(self, x):
    y = self.softmax(x.astype(jnp.float32))
    return nn.with_logical_constraint(y, ("batch", "length", "vocab"))

  def __call__(self, ids):
    return self.embed(ids)


def sequence_grid(length: int, input_modality: str) -> tuple[int, int]:
  """The 2-D grid an encoder output came from: images are square grids, sequences are L x 1."""
  if input_modality != "image":
    return length, 1
  side = int(round(length**0.5))
  if side * side != length:
    raise ValueError(f"image encoder output of {length} positions is not a square grid")
  return side, side


class CategoricalModality(nn.Module):
  """Downsampling head (Xception exit flow): residual separable convs, ReLU, mean pool, classes.

  One head per class count, whatever the input modality: sequences come in as L x 1 grids.
  """

  num_classes: int
  dtype: jnp.dtype = jnp.float32
  kernels: str = "cpu"

  @nn.compact
  def __call__(self, x, mask, grid: tuple[int, int]):
    b, _, d = x.shape
    x = x.reshape(b, *grid, d)
    mask = mask.reshape(b, *grid)
    # Always 3x3, so one head serves image grids and L x 1 sequences alike (there the outer
    # columns only ever meet zero padding).
    kernel = (3, 3)
    strides = tuple(2 if n > 1 else 1 for n in grid)
    wide = int(1.25 * d)
    step = functools.partial(
      ConvStep, kernel_size=kernel, channel_name="channels", dtype=self.dtype, kernels=self.kernels
    )
    skip = ConvNorm(wide, kernel, strides, dtype=self.dtype, kernels=self.kernels, name="skip")(
      x, mask
    )
    y = step(d, name="step0")(x, mask)
    y = step(wide, name="step1")(y, mask)
    y, mask = masked_max_pool(y, mask, kernel, strides)
    y = zero_padding(y + skip, mask)
    y = step(2 * d, first_relu=False, name="step2")(y, mask)
    y = step(int(2.5 * d), name="step3")(y, mask)
    y = zero_padding(nn.relu(y).astype(jnp.float32), mask)
    pooled = y.sum((1, 2)) / jnp.maximum(mask.sum((1, 2)), 1.0)[:, None]
    logits = Dense(
      self.num_classes, ("channels", "classes"), use_bias=True, kernels=self.kernels, name="logits"
    )(pooled)
    return nn.with_logical_constraint(logits, ("batch", "classes"))
