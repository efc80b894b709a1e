"""Penn Treebank (WSJ) constituency trees as a TFDS dataset, from .mrg files the user owns.

The treebank is LDC-licensed, so nothing is downloaded: point config.data.ptb_dir (or tfds'
manual_dir) at the treebank's `parsed/mrg/wsj` directory. Standard split: sections 02-21 train,
22 validation, 23 test. Trees are stored cleaned (no traces or function tags) in Penn brackets;
the pipeline linearises them (mm_jax/data/trees.py).
"""

import os
import re

import tensorflow_datasets as tfds

from mm_jax.data import trees

_SECTION = re.compile(r"wsj_(\d\d)\d\d\.mrg$")
SPLIT_SECTIONS = {
  "train": set(range(2, 22)),
  "validation": {22},
  "test": {23},
}


def split_trees(text: str) -> list[str]:
  """Top-level bracketed expressions of a .mrg file (several trees per file)."""
  out, depth, start = [], 0, None
  for i, ch in enumerate(text):
    if ch == "(":
      if depth == 0:
        start = i
      depth += 1
    elif ch == ")":
      depth -= 1
      if depth == 0 and start is not None:
        out.append(text[start : i + 1])
        start = None
      depth = max(depth, 0)
  return out


def section_of(path: str) -> int | None:
  match = _SECTION.search(os.path.basename(path))
  return int(match.group(1)) if match else None


class MmPennTreebank(tfds.core.GeneratorBasedBuilder):
  """WSJ constituency trees from a local Penn Treebank copy."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  The Penn Treebank is licensed by the LDC (LDC99T42) and cannot be downloaded automatically.
  Put its WSJ .mrg files (e.g. treebank_3/parsed/mrg/wsj, sections 00-24, files wsj_SSNN.mrg) in
  the manual directory, or set --config.data.ptb_dir=/path/to/parsed/mrg/wsj.
  """

  def _info(self):
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {"sentence": tfds.features.Text(), "tree": tfds.features.Text()}
      ),
      supervised_keys=("sentence", "tree"),
      homepage="https://catalog.ldc.upenn.edu/LDC99T42",
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    paths = sorted(
      os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".mrg")
    )
    if not paths:
      raise FileNotFoundError(f"no .mrg files under {root}: {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return {
      split: self._generate_examples([p for p in paths if section_of(p) in sections])
      for split, sections in SPLIT_SECTIONS.items()
    }

  def _generate_examples(self, paths):
    for path in paths:
      with open(path, encoding="utf-8", errors="replace") as f:
        for i, text in enumerate(split_trees(f.read())):
          tree = trees.clean(trees.parse(text))
          if tree is None:
            continue
          yield (
            f"{os.path.basename(path)}:{i}",
            {
              "sentence": " ".join(trees.words(tree)),
              "tree": trees.to_penn(tree),
            },
          )
