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
from mm_jax.data.embedded.base import EmbeddedBuilder, is_held_out

MIN_WORDS, MAX_WORDS = 3, 16  # punctuation included; keeps linearised trees within ~64 tokens
HELD_OUT_FRACTION = 0.05


def sample_trees(seed: int, num_train: int, num_test: int) -> dict[str, list[english.Tree]]:
  generator = english.Generator(random.Random(seed), english.PARSING)
  seen, splits = set(), {"train": [], "test": []}
  wanted = {"train": num_train, "test": num_test}
  while any(len(splits[s]) < wanted[s] for s in splits):
    tree = generator.sentence()
    words = english.leaves(tree)
    sentence = " ".join(words)
    if not MIN_WORDS <= len(words) <= MAX_WORDS or sentence in seen:
      continue
    split = "test" if is_held_out(sentence, HELD_OUT_FRACTION, salt="parsing") else "train"
    if len(splits[split]) < wanted[split]:
      seen.add(sentence)
      splits[split].append(tree)
  return splits


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
