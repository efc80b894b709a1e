"""Several task groups' sequences laid end to end, so that the shared body runs once per step.

Each task group has its own [batch, length] shape, and XLA compiles a separate copy of every body
kernel for every shape: with four groups the train step was four bodies' worth of kernels, and
compile time grows with the kernel count (docs/performance.md). Packed, the groups' examples sit
one after another along a single length axis, [rows, tokens, d], and the body's per-token work
(pointwise convs, LayerNorm, MoE, residuals) is one kernel each. Only what looks across positions
needs the sequence boundaries: the depthwise convs mask every tap that would reach into a
neighbouring sequence (`tap_valid`), and attention runs per group on the unpacked queries and
memory.

Row r holds the r-th contiguous slice of every group's batch. There are as many rows as the
groups' batch sizes have in common (their gcd): a multiple of the data-parallel size whenever each
batch is one, so every shard packs only its own examples and packing moves no data between
devices; and XLA:CPU splits a kernel's work over threads along the leading axis, which one row
would leave single-threaded.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Packing:
  """Static layout: `rows` rows; per group, each row holds `n` sequences of `length` (segments)."""

  rows: int
  segments: tuple[tuple[int, int], ...]  # (sequences per row, length), one pair per group

  @classmethod
  def of(cls, shapes, rows: int | None = None) -> "Packing":
    """Layout for groups of [batch, length] `shapes` (rows: default, the batches' gcd)."""
    rows = rows or math.gcd(*(batch for batch, _ in shapes))
    segments = []
    for batch, length in shapes:
      if batch % rows:
        raise ValueError(f"a task group's batch of {batch} does not split into {rows} rows")
      segments.append((batch // rows, length))
    return cls(rows, tuple(segments))

  @property
  def tokens(self) -> int:
    """Positions per row."""
    return sum(n * length for n, length in self.segments)

  def pack(self, arrays):
    """[batch_g, length_g, ...] per group -> [rows, tokens, ...]."""
    flat = [
      a.reshape(self.rows, n * length, *a.shape[2:])
      for a, (n, length) in zip(arrays, self.segments)
    ]
    return flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=1)

  def unpack(self, x):
    """[rows, tokens, ...] -> [batch_g, length_g, ...] per group (pack's inverse)."""
    return list(_unpack(self, x))

  def positions(self) -> np.ndarray:
    """[tokens] position of each token within its own sequence."""
    return np.concatenate([np.tile(np.arange(length), n) for n, length in self.segments])

  def sequence_lengths(self) -> np.ndarray:
    """[tokens] the (padded) length of the sequence each token belongs to."""
    return np.concatenate([np.full(n * length, length) for n, length in self.segments])

  def tap_valid(self, offset: int) -> np.ndarray | None:
    """[tokens] float32: 1 where position + `offset` lies in the same sequence; None if all do."""
    return _tap_valid(self, offset)


def _slices(packing: Packing, x):
  out, start = [], 0
  for n, length in packing.segments:
    part = x[:, start : start + n * length]
    out.append(part.reshape(packing.rows * n, length, *x.shape[2:]))
    start += n * length
  return tuple(out)


# The gradient of a slice is a zero-padded copy of the whole array: unpacking into G groups would
# write G full-size arrays and add them up. Packing the groups' gradients is one concatenation.
_unpack = jax.custom_vjp(_slices, nondiff_argnums=(0,))
_unpack.defvjp(
  lambda packing, x: (_slices(packing, x), None), lambda packing, _, grads: (packing.pack(grads),)
)


@functools.lru_cache(maxsize=256)
def _tap_valid(packing: Packing, offset: int) -> np.ndarray | None:
  source = packing.positions() + offset
  valid = (source >= 0) & (source < packing.sequence_lengths())
  return None if valid.all() else valid.astype(np.float32)
