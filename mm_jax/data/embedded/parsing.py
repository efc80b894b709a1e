"""`mm_embedded_parsing`: sentences with gold Penn-style constituency trees.

No treebank installs by package name, so the trees come from the seeded grammar in english.py
(a real English lexicon with Penn POS tags; PPs, relative clauses, sentential complements,
coordination). The "tree" string has the format of a Penn Treebank .mrg tree without the outer
empty bracket, e.g. "(S (NP (DT The) (NN dog)) (VP (VBZ barks)) (. .))"; "sentence" is its words
joined by spaces. Held-out sentences never occur in train, and no sentence occurs twice.
"""

import random

import tensorflow_datasets as tfds

from mm_jax.data.embedded import english
from mm_jax.data.embedded.base import EmbeddedBuilder, fill_splits

MIN_WORDS, MAX_WORDS = 3, 16  # punctuation included; keeps linearised trees within ~64 tokens
HELD_OUT_FRACTION = 0.05


def _keyed_trees(seed: int):
  generator = english.Generator(random.Random(seed), english.PARSING)
  while True:
    tree = generator.sentence()
    words = english.leaves(tree)
    if MIN_WORDS <= len(words) <= MAX_WORDS:
      yield " ".join(words), tree


def sample_trees(seed: int, num_train: int, num_test: int) -> dict[str, list[english.Tree]]:
  """Distinct sentences, split by sentence."""
  return fill_splits(
    _keyed_trees(seed), num_train, num_test, held_out_fraction=HELD_OUT_FRACTION, salt="parsing"
  )


class MmEmbeddedParsing(EmbeddedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Seeded English grammar, 3-16 tokens per sentence."}
  SIZES = {"tiny": (32, 16), "full": (20000, 1000)}
  SEED = 1993  # the year of the Penn Treebank paper

  def _info(self) -> tfds.core.DatasetInfo:
    return self._embedded_info(
      {"sentence": tfds.features.Text(), "tree": tfds.features.Text()},
      "Gold Penn-style trees from a seeded probabilistic English grammar (see english.py).",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    trees = sample_trees(self.SEED, *self.split_sizes)
    return {split: self._generate_examples(t) for split, t in trees.items()}

  def _generate_examples(self, trees):
    for index, tree in enumerate(trees):
      yield index, {"sentence": " ".join(english.leaves(tree)), "tree": english.bracketed(tree)}
