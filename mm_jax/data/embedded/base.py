"""What every embedded builder shares: a build scale on record and seeded, hash-based splits.

The scale ("tiny" for tests, "full" for training) is a constructor argument rather than a builder
config so that part B can load every dataset by its plain name; it is saved in the dataset's
metadata so that `build_all` can tell a tiny build from a full one in the same data_dir.
"""

import hashlib
from collections.abc import Iterable

import tensorflow_datasets as tfds

from mm_jax.data.layout import EMBEDDED_SCALES as SCALES


def scale_covers(built: str | None, wanted: str) -> bool:
  """A full build serves a tiny request too; a tiny build never serves a full one."""
  if built not in SCALES:
    return False
  return SCALES.index(built) >= SCALES.index(wanted)


def unit_hash(key: str, salt: str) -> float:
  """A platform- and process-independent number in [0, 1) (Python's hash() is salted)."""
  digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2**64


def is_held_out(key: str, fraction: float, salt: str) -> bool:
  """Splits by key, so every example sharing a key lands on the same side."""
  return unit_hash(key, salt) < fraction


def stable_order(keys: Iterable[str], salt: str) -> list[str]:
  """A seeded shuffle that does not depend on the input order."""
  return sorted(set(keys), key=lambda k: (unit_hash(k, salt), k))


def fill_splits(
  keyed_items: Iterable[tuple[str, object]],
  num_train: int,
  num_test: int,
  *,
  held_out_fraction: float,
  salt: str,
  repeat_train_keys: bool = False,
) -> dict[str, list]:
  """Routes an endless stream of (key, item) to "test" when the key is held out, else to "train",
  until each split is full; a key appears at most once per split unless repeat_train_keys."""
  wanted = {"train": num_train, "test": num_test}
  splits = {"train": [], "test": []}
  seen = {"train": set(), "test": set()}
  for key, item in keyed_items:
    split = "test" if is_held_out(key, held_out_fraction, salt) else "train"
    repeats_ok = split == "train" and repeat_train_keys
    if len(splits[split]) < wanted[split] and (repeats_ok or key not in seen[split]):
      seen[split].add(key)
      splits[split].append(item)
    if all(len(splits[s]) == wanted[s] for s in splits):
      return splits
  raise ValueError(f"the stream ended before {wanted} examples were found")


class EmbeddedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A local builder whose size is set by `scale`; subclasses give SIZES[scale] = (train, test)."""

  SIZES: dict[str, tuple[int, int]] = {}

  def __init__(self, *, scale: str = "full", **kwargs):
    if scale not in SCALES:
      raise ValueError(f"embedded scale must be one of {SCALES}, got {scale!r}")
    self._scale = scale
    super().__init__(**kwargs)

  @property
  def scale(self) -> str:
    return self._scale

  @property
  def split_sizes(self) -> tuple[int, int]:
    return self.SIZES[self._scale]

  def _embedded_info(self, features: dict, description: str) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=description,
      features=tfds.features.FeaturesDict(features),
      metadata=tfds.core.MetadataDict(scale=self._scale),
    )
