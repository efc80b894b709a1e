"""Task registry, parse-tree linearisation and scoring, the PTB builder, log-mel features."""

import collections

import numpy as np
import pytest
import tensorflow as tf

from configs.multimodel import ALL_TASKS
from mm_jax.data import features, ptb, tasks, trees
from mm_jax.errors import ConfigError
from mm_jax.models.signature import TaskSignature

GOLD = (
  "( (S (NP-SBJ (DT The) (NN cat)) (VP (VBZ sits) (PP-LOC (IN on) (NP (DT the) (NN mat)))) (. .)) )"
)
GOLD_LINEAR = "(S (NP DT NN )NP (VP VBZ (PP IN (NP DT NN )NP )PP )VP . )S"


# --- registry -------------------------------------------------------------------------------


def test_registry_covers_the_configs_tasks_in_both_mixtures():
  assert set(tasks.TASKS) == set(ALL_TASKS)
  for name in ALL_TASKS:
    for mixture in ("embedded", "paper"):
      task = tasks.resolve(name, mixture)
      assert isinstance(task.signature, TaskSignature)
      assert task.target_space in tasks.TARGET_SPACES
      assert task.metrics


def test_registry_entries_match_the_paper():
  expect = {
    "image_classification": ("image", "categorical", "class", "imagenet2012"),
    "image_captioning": ("image", "language", "en", "coco_captions/2014"),
    "speech_recognition": ("audio", "language", "en", "librispeech"),
    "constituency_parsing": ("language", "language", "parse", "mm_penn_treebank"),
    "translate_en_de": ("language", "language", "de", "wmt14_translate/de-en"),
    "translate_de_en": ("language", "language", "en", "wmt14_translate/de-en"),
    "translate_en_fr": ("language", "language", "fr", "wmt14_translate/fr-en"),
    "translate_fr_en": ("language", "language", "en", "wmt14_translate/fr-en"),
  }
  for name, (inp, out, space, source) in expect.items():
    task = tasks.resolve(name, "paper")
    assert (task.signature.input_modality, task.signature.target_modality) == (inp, out)
    assert (task.target_space, task.source.tfds_name) == (space, source)
  assert tasks.resolve("image_classification", "paper").signature.num_classes == 1000
  assert tasks.resolve("image_classification", "embedded").signature.num_classes == 10
  assert tasks.resolve("image_classification", "paper").metrics == ("accuracy", "top5")
  assert tasks.resolve("constituency_parsing", "paper").metrics == ("bracket_f1", "tree_exact")


def test_translation_adapters_pick_the_right_direction():
  ex = {"en": tf.constant("hello"), "de": tf.constant("hallo")}
  de_en = tasks.resolve("translate_de_en", "paper").source.adapter(ex, tf.constant([0, 0]))
  en_de = tasks.resolve("translate_en_de", "paper").source.adapter(ex, tf.constant([0, 0]))
  assert (de_en["input_text"].numpy(), de_en["target_text"].numpy()) == (b"hallo", b"hello")
  assert (en_de["input_text"].numpy(), en_de["target_text"].numpy()) == (b"hello", b"hallo")


def test_unknown_task_or_mixture_is_a_config_error():
  with pytest.raises(ConfigError, match="config.data.tasks"):
    tasks.resolve("image_segmentation", "paper")
  with pytest.raises(ConfigError, match="config.data.mixture"):
    tasks.resolve("translate_en_de", "laptop")


# --- trees ----------------------------------------------------------------------------------


def test_ptb_tree_is_cleaned_and_linearised_without_words():
  sentence, linear = trees.penn_to_example(GOLD)
  assert sentence == "The cat sits on the mat ."
  assert linear == GOLD_LINEAR
  assert trees.penn_to_example(GOLD, "xx")[1] == GOLD_LINEAR.replace("DT", "XX").replace(
    "NN", "XX"
  ).replace("VBZ", "XX").replace("IN", "XX").replace(" . ", " XX ")


def test_traces_and_emptied_constituents_are_removed():
  text = "(S (NP-SBJ-1 (-NONE- *T*-1)) (VP (VBD ran) (NP=2 (-NONE- *U*))) (. .))"
  tree = trees.clean(trees.parse(text))
  assert trees.to_penn(tree) == "(S (VP (VBD ran)) (. .))"
  assert trees.words(tree) == ["ran", "."]


def test_bracket_f1_against_a_hand_count():
  # Gold brackets: S(0,7) NP(0,2) VP(2,6) PP(3,6) NP(4,6). Prediction attaches the PP to the
  # whole sentence: S(0,7) NP(0,2) VP(2,3) PP(3,6) NP(4,6) -> 4 of 5 match either way.
  predicted = "(S (NP DT NN )NP (VP VBZ )VP (PP IN (NP DT NN )NP )PP . )S"
  precision, recall, f1 = trees.bracket_f1(predicted, GOLD_LINEAR)
  assert (precision, recall, f1) == pytest.approx((0.8, 0.8, 0.8))
  assert trees.bracket_f1(GOLD_LINEAR, GOLD_LINEAR) == (1.0, 1.0, 1.0)
  assert trees.tree_exact(GOLD_LINEAR, GOLD_LINEAR) and not trees.tree_exact(predicted, GOLD_LINEAR)


def test_bracket_scoring_tolerates_malformed_predictions():
  spans = trees.labelled_brackets(")NP (S (NP DT NN )NP VBZ")
  assert spans == collections.Counter({("S", 0, 3): 1, ("NP", 0, 2): 1})
  assert trees.bracket_f1("", GOLD_LINEAR) == (0.0, 0.0, 0.0)


def test_malformed_penn_tree_raises_value_error():
  with pytest.raises(ValueError):
    trees.parse("(S (NP (DT The) (NN cat))")
  with pytest.raises(ValueError):
    trees.parse("no brackets")


# --- the PTB manual-dir builder -------------------------------------------------------------


def _write_mrg(root, section, number, trees_text):
  path = root / "wsj" / f"{section:02d}" / f"wsj_{section:02d}{number:02d}.mrg"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(trees_text))


def test_ptb_builder_reads_mrg_sections_into_standard_splits(tmp_path):
  import tensorflow_datasets as tfds

  manual = tmp_path / "ptb"
  other = "( (S (NP (PRP It)) (VP (VBD rained)) (. .)) )"
  _write_mrg(manual, 2, 1, [GOLD, other])
  _write_mrg(manual, 21, 99, [other])
  _write_mrg(manual, 22, 0, [GOLD])
  _write_mrg(manual, 23, 5, [other])
  _write_mrg(manual, 24, 0, [GOLD])  # section 24 belongs to no standard split
  builder = ptb.MmPennTreebank(data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  counts = {s: i.num_examples for s, i in builder.info.splits.items()}
  assert counts == {"train": 3, "validation": 1, "test": 1}
  (example,) = tfds.as_numpy(builder.as_dataset(split="validation"))
  assert example["sentence"] == b"The cat sits on the mat ."
  assert trees.penn_to_example(example["tree"].decode())[1] == GOLD_LINEAR


def test_ptb_split_trees_and_sections():
  assert ptb.split_trees(f"{GOLD}\n\n(S (X y))\n") == [GOLD, "(S (X y))"]
  assert ptb.section_of("/a/wsj_2301.mrg") == 23
  assert ptb.section_of("/a/notes.mrg") is None


# --- log-mel --------------------------------------------------------------------------------


def _reference_power(samples: np.ndarray) -> np.ndarray:
  """float64 framing, periodic Hann window and |rfft|^2, written out here."""
  n = (len(samples) - features.WINDOW) // features.HOP + 1
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(features.WINDOW) / features.WINDOW)
  frames = np.stack(
    [samples[i * features.HOP : i * features.HOP + features.WINDOW] for i in range(n)]
  )
  return np.abs(np.fft.rfft(frames * window, n=features.FFT)) ** 2


def test_log_mel_matches_a_float64_reference():
  rng = np.random.default_rng(0)
  t = np.arange(8000) / features.SAMPLE_RATE
  wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.shape)
  samples = np.round(wave * 32767).astype(np.int16)
  got = features.log_mel(tf.constant(samples), 40).numpy()
  mel_matrix = tf.signal.linear_to_mel_weight_matrix(
    40, features.FFT // 2 + 1, features.SAMPLE_RATE, features.LOWER_HZ, features.UPPER_HZ
  ).numpy()
  mel = np.log(_reference_power(samples / 32768.0) @ mel_matrix.astype(np.float64) + 1e-6)
  ref = (mel - mel.mean(0)) / np.sqrt(mel.var(0) + 1e-5)
  assert got.shape == (1 + (8000 - 400) // 160, 40) == (48, 40)
  assert int(features.num_frames(8000)) == 48
  np.testing.assert_allclose(got, ref, atol=2e-3)
  # A 440 Hz tone: the loudest raw mel bin is the one whose band holds 440 Hz.
  raw = _reference_power(samples / 32768.0) @ mel_matrix
  assert (
    mel_matrix[int(round(440 / (features.SAMPLE_RATE / features.FFT))), raw.mean(0).argmax()] > 0
  )
