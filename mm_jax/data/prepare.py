"""The datasets a config reads, made ready on this machine: the embedded mixture built on first
use, the local TFDS builders registered. Nothing here reads examples."""

import tensorflow_datasets as tfds

from mm_jax.data.layout import tfds_data_dir

_PREPARED: set[str] = set()  # embedded directories checked in this process


def ensure_prepared(config) -> None:
  """Builds the embedded mixture on first use; registers the local builders either way."""
  from mm_jax.data import ptb  # noqa: F401  (registers mm_penn_treebank)

  if config.data.mixture != "embedded":
    return
  from mm_jax.data import embedded

  directory = tfds_data_dir(config)
  if directory in _PREPARED:
    return
  names = embedded.dataset_names()
  if not all(tfds.builder(name, data_dir=directory).is_prepared() for name in names):
    embedded.build_all(directory, config.data.embedded_scale)
  _PREPARED.add(directory)
