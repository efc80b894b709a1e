"""`mm_embedded_speech`: short English sentences spoken by many espeak-ng voices, at 16 kHz.

Sentences come from the grammar in english.py with its recursive rules off (3 to 7 words, a few
hundred common words), so a small model can learn the task on a CPU; voices, variants, speaking
rates and pitches vary per utterance. Held-out sentences never occur in train (split by sentence).
"""

import os
import random

import numpy as np
import tensorflow_datasets as tfds

from mm_jax.data.embedded import english, espeak
from mm_jax.data.embedded.base import EmbeddedBuilder, fill_splits

MAX_SECONDS = 3.5
MIN_WORDS, MAX_WORDS = 3, 7
HELD_OUT_FRACTION = 0.08
VOICES = (
  "en",
  "en-us",
  "en-gb-x-rp",
  "en-gb-scotland",
  "en-029",
  "en-us-nyc",
  "en-gb-x-gbclan",
  "en-gb-x-gbcwmd",
)
VARIANTS = ("",) + tuple(f"+f{i}" for i in range(1, 6)) + tuple(f"+m{i}" for i in range(1, 8))
VARIANTS += ("+klatt", "+klatt2")


class RawAudio(tfds.features.Audio):
  """Audio stored as raw bytes (2 per int16 sample) rather than int64 varints (up to 10).

  TFDS's Audio accepts `encoding=BYTES` but skips the encoding step for numpy input (4.9.10), so
  this subclass puts it back. Reading is unchanged: an int16 tensor [num_samples].
  """

  def __init__(self, *, encoding=tfds.features.Encoding.BYTES, **kwargs):
    super().__init__(encoding=encoding, **kwargs)

  def encode_example(self, audio):
    return tfds.features.Tensor.encode_example(self, np.asarray(audio, dtype=np.int16))


def speech_sentences(seed: int):
  """Endless lowercase sentences without punctuation, as an ASR transcript would be."""
  generator = english.Generator(random.Random(seed), english.SPEECH)
  while True:
    words = [w.lower() for w in english.leaves(generator.sentence()) if w != "."]
    if MIN_WORDS <= len(words) <= MAX_WORDS:
      yield " ".join(words)


def voice_for(split: str, index: int, seed: int) -> espeak.Voice:
  rng = random.Random(f"{seed}/{split}/{index}")
  return espeak.Voice(
    name=rng.choice(VOICES) + rng.choice(VARIANTS),
    rate=rng.randint(140, 210),
    pitch=rng.randint(25, 75),
    pitch_range=rng.randint(20, 80),
  )


def split_sentences(seed: int, num_train: int, num_test: int) -> dict[str, list[str]]:
  """Train sentences (repeats allowed, other voices) and distinct held-out ones, never shared."""
  return fill_splits(
    ((text, text) for text in speech_sentences(seed)),
    num_train,
    num_test,
    held_out_fraction=HELD_OUT_FRACTION,
    salt="speech",
    repeat_train_keys=True,
  )


class MmEmbeddedSpeech(EmbeddedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "espeak-ng 1.52 voices, grammar sentences of 3-7 words, <= 3.5 s."}
  # Drawn per split; utterances over MAX_SECONDS are dropped, so counts can come out a little lower.
  SIZES = {"tiny": (24, 12), "full": (5000, 300)}
  SEED = 1706

  def _info(self) -> tfds.core.DatasetInfo:
    return self._embedded_info(
      {
        "speech": RawAudio(dtype=np.int16, sample_rate=espeak.SAMPLE_RATE),
        "text": tfds.features.Text(),
      },
      "English sentences synthesised with espeak-ng (espeakng-loader wheel), 16 kHz int16.",
    )

  def _split_generators(self, dl_manager):
    cache = espeak.SpeechCache(os.path.join(dl_manager.download_dir, "mm_embedded_speech"))
    sentences = split_sentences(self.SEED, *self.split_sizes)
    utterances = {
      split: self._synthesise(cache, split, texts) for split, texts in sentences.items()
    }
    cache.flush()
    self.info.metadata["dropped_over_max_seconds"] = {
      split: len(sentences[split]) - len(kept) for split, kept in utterances.items()
    }
    return {split: self._generate_examples(kept) for split, kept in utterances.items()}

  def _synthesise(self, cache, split: str, texts: list[str]) -> list[tuple[str, np.ndarray]]:
    kept = []
    for index, text in enumerate(texts):
      audio = cache.get(text, voice_for(split, index, self.SEED))
      if len(audio) <= MAX_SECONDS * espeak.SAMPLE_RATE:
        kept.append((text, audio))
    return kept

  def _generate_examples(self, utterances):
    for index, (text, audio) in enumerate(utterances):
      yield index, {"speech": audio, "text": text}
