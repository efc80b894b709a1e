"""The embedded offline mixture: local TFDS builders over data that installs by package name.

Importing this package registers the builders, after which `tfds.load(name, data_dir=...)` works on
them as on any dataset once `build_all(data_dir, scale)` has prepared them:

  mm_embedded_digits           {"image": uint8 [28, 28, 1], "label": ClassLabel(10)}
  mm_embedded_captions         {"image": uint8 [64, 64, 3], "caption": Text}
  mm_embedded_speech           {"speech": Audio int16 16 kHz, "text": Text}
  mm_embedded_translation/de-en, /fr-en   {"en": Text, "de" | "fr": Text}
  mm_embedded_parsing          {"sentence": Text, "tree": Text (Penn-style bracketed)}

Every dataset has splits "train" and "test" (held out, disjoint from train).
"""

import contextlib
import io
import logging
import time

import tensorflow_datasets as tfds
from etils import epath

from mm_jax.data.embedded.base import SCALES, scale_covers
from mm_jax.data.embedded.captions import MmEmbeddedCaptions
from mm_jax.data.embedded.digits import MmEmbeddedDigits
from mm_jax.data.embedded.parsing import MmEmbeddedParsing
from mm_jax.data.embedded.speech import MmEmbeddedSpeech
from mm_jax.data.embedded.translation import MmEmbeddedTranslation

__all__ = ["BUILDERS", "SCALES", "build_all", "dataset_names"]

# (builder class, config name) for each dataset of the mixture.
BUILDERS = (
  (MmEmbeddedDigits, None),
  (MmEmbeddedCaptions, None),
  (MmEmbeddedSpeech, None),
  (MmEmbeddedParsing, None),
  (MmEmbeddedTranslation, "de-en"),
  (MmEmbeddedTranslation, "fr-en"),
)


def _dataset_name(cls, config: str | None) -> str:
  return f"{cls.name}/{config}" if config else cls.name


def dataset_names() -> list[str]:
  """The names to pass to tfds.load, e.g. "mm_embedded_translation/de-en"."""
  return [_dataset_name(cls, config) for cls, config in BUILDERS]


def build_all(data_dir: str, scale: str = "full") -> dict[str, dict[str, int]]:
  """Prepares every dataset that data_dir lacks at `scale` or larger; returns example counts.

  Idempotent: prepared datasets are reused (a full build also serves "tiny"); a tiny build is
  replaced when "full" is asked for. Safe if interrupted: TFDS writes each dataset into an
  "incomplete.*" directory and renames it only when complete, so a killed build leaves nothing
  that looks prepared and the next call starts that dataset again.
  """
  if scale not in SCALES:
    raise ValueError(f"embedded scale must be one of {SCALES}, got {scale!r}")
  counts = {}
  for cls, config in BUILDERS:
    name = _dataset_name(cls, config)
    builder = cls(data_dir=data_dir, config=config, scale=scale)
    if builder.is_prepared() and scale_covers(builder.info.metadata.get("scale"), scale):
      logging.info("%s: reusing the %s build in %s", name, builder.info.metadata["scale"], data_dir)
    else:
      if builder.is_prepared():
        logging.info("%s: replacing the smaller build in %s", name, builder.data_dir)
        epath.Path(builder.data_dir).rmtree()
        builder = cls(data_dir=data_dir, config=config, scale=scale)
      start = time.time()
      _prepare_quietly(builder)
      counts[name] = _split_sizes(builder)
      split_text = ", ".join(f"{n:,} {split}" for split, n in counts[name].items())
      print(f"data: built {name} ({split_text}) in {time.time() - start:.1f} s", flush=True)
    counts[name] = _split_sizes(builder)
  return counts


def _split_sizes(builder) -> dict[str, int]:
  return {split: info.num_examples for split, info in builder.info.splits.items()}


def _prepare_quietly(builder) -> None:
  """TFDS's build prints its own banner and a progress bar per split and shuffle to stdout; the
  caller prints one line per dataset instead."""
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
      )
  finally:
    tfds.display_progress_bar(True)
