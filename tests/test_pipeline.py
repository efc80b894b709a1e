"""tf.data pipelines: paper sources on mock data, the embedded tiny build, counters, state."""

import io
import json
import os
import random

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from configs.multimodel import ALL_TASKS, get_config
from mm_jax import mixture
from mm_jax.data import pipeline, tasks, tokenizer, trees
from mm_jax.errors import ConfigError

TREE = "(S (NP (DT The) (NN cat)) (VP (VBZ sits) (PP (IN on) (NP (DT the) (NN mat)))) (. .))"
SPACES = {name: tasks.TARGET_SPACES.index(tasks.TASKS[name].target_space) for name in ALL_TASKS}


@pytest.fixture(scope="module")
def tok():
  rng = random.Random(0)
  words = [
    "the",
    "a",
    "cat",
    "dog",
    "sits",
    "runs",
    "on",
    "mat",
    "der",
    "die",
    "das",
    "Haus",
    "le",
    "la",
    "chat",
    "über",
    "été",
  ]
  texts = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(500)]
  return tokenizer.train(texts + [trees.penn_to_example(TREE)[1]] * 50, 256)


def _config(tmp_path, tasks_arg, mixture="paper", **data):
  config = get_config(f"tiny,tasks={tasks_arg}")
  config.data.mixture = mixture
  config.data.data_dir = str(tmp_path)
  config.data.shuffle_buffer = 8
  config.data.global_batch_size = 8 * len(tasks_arg.split("+"))
  for key, value in data.items():
    config.data[key] = value
  return config


def _check_batch(config, name, batch, batch_size):
  d = config.data
  sig = tasks.resolve(name, config.data.mixture).signature
  assert batch["target_space"].dtype == np.int32
  assert (batch["target_space"] == SPACES[name]).all()
  if sig.input_modality == "image":
    size = d.image_size if sig.target_modality == "categorical" else d.caption_image_size
    assert batch["inputs"].shape == (batch_size, size, size, 3)
    assert batch["inputs"].dtype == np.float32
    assert batch["inputs"].min() >= -1.0 and batch["inputs"].max() <= 1.0
  elif sig.input_modality == "audio":
    frames, bins = d.max_audio_frames, config.model.audio_num_mel_bins
    assert batch["inputs"].shape == (batch_size, frames, bins)
    assert batch["inputs_mask"].shape == (batch_size, frames)
    assert batch["inputs"].dtype == batch["inputs_mask"].dtype == np.float32
    assert (batch["inputs"] * (1 - batch["inputs_mask"])[..., None] == 0).all()
  else:
    assert batch["inputs"].shape == (batch_size, d.max_text_length)
    assert batch["inputs"].dtype == np.int32
  if sig.target_modality == "categorical":
    assert batch["targets"].shape == (batch_size,) and batch["targets"].dtype == np.int32
    assert ((batch["targets"] >= 0) & (batch["targets"] < sig.num_classes)).all()
  else:
    targets = batch["targets"]
    assert targets.shape == (batch_size, d.max_text_length) and targets.dtype == np.int32
    # Every sequence ends in exactly one EOS, followed only by padding.
    assert ((targets == tokenizer.EOS_ID).sum(1) == 1).all()
    eos_at = (targets == tokenizer.EOS_ID).argmax(1)
    assert all((row[i + 1 :] == 0).all() for row, i in zip(targets, eos_at))


# --- paper sources on mock data -------------------------------------------------------------

MOCKED = "image_classification+speech_recognition+" + "+".join(
  t for t in ALL_TASKS if t.startswith("translate")
)


def test_paper_pipelines_on_tfds_mock_data(tmp_path, tok):
  config = _config(tmp_path, MOCKED, max_audio_frames=64)
  config.model.audio_num_mel_bins = 24  # not the default 40: the features follow the config
  with tfds.testing.mock_data(num_examples=16):
    it = pipeline.TrainIterator(config, data_parallel=8, tokenizer=tok)
    step = next(it)
  assert set(step) == set(MOCKED.split("+"))
  for name, batch in step.items():
    _check_batch(config, name, batch, 8)
  # Directions of one pair shuffle independently (seeded per task), so they differ.
  assert not np.array_equal(step["translate_en_de"]["inputs"], step["translate_de_en"]["targets"])


def _png(rng, height, width, channels=3):
  pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(buf, format="PNG")
  return buf.getvalue()


def _fake_coco_and_ptb(self, split, decoders=None, read_config=None, **kwargs):
  """Examples with the real feature structure (images as encoded bytes, as SkipDecoding gives).

  tfds' own mock generator breaks on coco_captions' Sequence-of-dict captions in this version.
  """
  rng = np.random.default_rng(0)
  if self.name == "coco_captions":
    images = [_png(rng, int(rng.integers(20, 60)), int(rng.integers(20, 60))) for _ in range(12)]
    captions = [[f"a cat number {i}", f"a dog {i}"] for i in range(12)]
    ds = tf.data.Dataset.from_generator(
      lambda: ({"image": im, "captions": {"text": c}} for im, c in zip(images, captions)),
      output_signature={
        "image": tf.TensorSpec([], tf.string),
        "captions": {"text": tf.TensorSpec([None], tf.string)},
      },
    )
    return ds
  assert self.name == "mm_penn_treebank"
  sentence, _ = trees.penn_to_example(TREE)
  return tf.data.Dataset.from_tensor_slices({"sentence": [sentence] * 12, "tree": [TREE] * 12})


def test_coco_and_ptb_pipelines_on_mock_data(tmp_path, tok):
  config = _config(tmp_path, "image_captioning+constituency_parsing", max_text_length=64)
  with tfds.testing.mock_data(as_dataset_fn=_fake_coco_and_ptb):
    step = next(pipeline.TrainIterator(config, data_parallel=8, tokenizer=tok))
    evals = next(
      pipeline.eval_batches(config, "constituency_parsing", 1, data_parallel=8, tokenizer=tok)
    )
  for name, batch in step.items():
    _check_batch(config, name, batch, 8)
  parse = step["constituency_parsing"]
  assert tok.decode(parse["targets"][0]) == trees.penn_to_example(TREE)[1]
  assert "cat sits on the mat" in tok.decode(parse["inputs"][0])
  assert evals["raw_targets"][0].decode() == trees.penn_to_example(TREE)[1]
  assert evals["raw_inputs"][0].decode() == "The cat sits on the mat ."
  captions = {tok.decode(row) for row in step["image_captioning"]["targets"]}
  assert all(c.startswith(("a cat number", "a dog")) for c in captions)


# --- counters: corrupt, empty, over-long --------------------------------------------------


def _run_examples(config, name, tok, records, signature):
  task = tasks.resolve(name, config.data.mixture)
  raw = tf.data.Dataset.from_generator(lambda: iter(records), output_signature=signature)
  out = list(pipeline.examples(config, task, tok, raw, seed=0).as_numpy_iterator())
  return out, dict(zip(pipeline.STATS, out[-1]["_stats"].tolist()))


def test_corrupt_image_is_skipped_and_counted(tmp_path, tok):
  config = _config(tmp_path, "image_classification")
  rng = np.random.default_rng(0)
  good = [{"image": _png(rng, 30, 40, 1), "label": i} for i in range(5)]
  records = good[:2] + [{"image": b"\x89PNG not really", "label": 7}] + good[2:]
  spec = {"image": tf.TensorSpec([], tf.string), "label": tf.TensorSpec([], tf.int64)}
  out, stats = _run_examples(config, "image_classification", tok, records, spec)
  assert [int(x["targets"]) for x in out] == [0, 1, 2, 3, 4]
  assert stats == {"seen": 6, "kept": 5, "errors": 1, "empty": 0, "too_long": 0, "truncated": 0}
  # Grayscale became three equal channels.
  assert np.array_equal(out[0]["inputs"][..., 0], out[0]["inputs"][..., 2])


def test_empty_text_and_long_audio_are_dropped_and_long_text_truncated(tmp_path, tok):
  config = _config(tmp_path, "speech_recognition", max_audio_frames=20, max_text_length=8)
  short, long = np.zeros(1600, np.int16), np.ones(40 * 160, np.int16)
  records = [
    {"speech": short + 3, "text": "THE CAT"},
    {"speech": long, "text": "THE DOG"},  # 39 frames > 20
    {"speech": short, "text": ""},
    {"speech": short + 5, "text": "the cat sits on the mat the cat sits on"},  # > 8 tokens
    {"speech": short + 7, "text": "the dog"},  # counters are read from the last kept example
  ]
  spec = {"speech": tf.TensorSpec([None], tf.int16), "text": tf.TensorSpec([], tf.string)}
  out, stats = _run_examples(config, "speech_recognition", tok, records, spec)
  assert stats == {"seen": 5, "kept": 3, "errors": 0, "empty": 1, "too_long": 1, "truncated": 1}
  assert tok.decode(out[0]["targets"]) == "the cat"
  assert out[0]["inputs_mask"].sum() == 1 + (1600 - 400) // 160
  truncated = out[1]["targets"]
  assert truncated[-1] == tokenizer.EOS_ID and (truncated != 0).all()

  config.data.text_overlength = "drop"
  _, stats = _run_examples(config, "speech_recognition", tok, records, spec)
  assert (stats["kept"], stats["too_long"], stats["truncated"]) == (2, 2, 0)


def test_per_task_text_lengths_override_max_text_length(tmp_path, tok):
  config = _config(tmp_path, "translate_en_de", max_text_length=12)
  config.data.input_lengths = {"translate_en_de": 4}
  config.data.target_lengths = {"translate_en_de": 16}
  records = [{"de": "der Hund", "en": "the cat sits on the mat the dog"}]
  spec = {"de": tf.TensorSpec([], tf.string), "en": tf.TensorSpec([], tf.string)}
  out, stats = _run_examples(config, "translate_en_de", tok, records, spec)
  inputs, targets = out[0]["inputs"], out[0]["targets"]
  assert inputs.shape == (4,) and targets.shape == (16,)
  # The English input is longer than 4 tokens: cut (EOS kept) and counted; the target fits.
  assert inputs[-1] == tokenizer.EOS_ID and (inputs != 0).all()
  assert tok.decode(targets) == "der Hund"
  assert stats["truncated"] == 1


def test_malformed_tree_is_counted_as_an_error(tmp_path, tok):
  config = _config(tmp_path, "constituency_parsing")
  records = [{"sentence": "x", "tree": "(S (NP"}, {"sentence": "x", "tree": TREE}]
  spec = {"sentence": tf.TensorSpec([], tf.string), "tree": tf.TensorSpec([], tf.string)}
  out, stats = _run_examples(config, "constituency_parsing", tok, records, spec)
  assert len(out) == 1 and (stats["errors"], stats["kept"]) == (1, 1)


# --- batch sizes ----------------------------------------------------------------------------


def test_task_batch_sizes_follow_weights():
  config = get_config("tiny,tasks=image_classification+translate_en_de+translate_de_en")
  config.data.global_batch_size = 64
  config.data.weights.image_classification = 2.0
  sizes = mixture.task_batch_sizes(config, 8)
  assert sizes == {"image_classification": 32, "translate_en_de": 16, "translate_de_en": 16}
  assert mixture.local_batch_sizes(config, 8, 2)["translate_en_de"] == 8
  config.data.global_batch_size = 16
  with pytest.raises(ConfigError, match="config.data.weights.translate_en_de"):
    mixture.task_batch_sizes(config, 8)
  config.data.weights.translate_en_de = 0.0
  with pytest.raises(ConfigError, match="positive weight"):
    mixture.task_batch_sizes(config, 8)


# --- iterator state -------------------------------------------------------------------------


def test_restored_iterator_gives_the_identical_next_batches(tmp_path, tok):
  config = _config(tmp_path, "image_classification+translate_en_fr")
  with tfds.testing.mock_data(num_examples=20):
    first = pipeline.TrainIterator(config, data_parallel=8, tokenizer=tok)
    for _ in range(3):  # past one epoch of 20 examples: reshuffled, still reproducible
      next(first)
    state = json.loads(json.dumps(first.get_state()))
    expected = [next(first) for _ in range(2)]
    resumed = pipeline.TrainIterator(config, data_parallel=8, tokenizer=tok)
    resumed.set_state(state)
    got = [next(resumed) for _ in range(2)]
  for want, have in zip(expected, got):
    for name in want:
      for key in want[name]:
        np.testing.assert_array_equal(want[name][key], have[name][key])
  assert resumed.counters() == first.counters()
  assert not np.array_equal(
    expected[0]["translate_en_fr"]["inputs"], expected[1]["translate_en_fr"]["inputs"]
  )
  config.data.seed = 1
  with pytest.raises(ConfigError, match=r"\(config\.data\.seed: 0 then, 1 now\)"):
    pipeline.TrainIterator(config, data_parallel=8, tokenizer=tok).set_state(state)
  config.data.seed = 0
  half = pipeline.TrainIterator(config, 0, 2, data_parallel=8, tokenizer=tok)  # 2 processes
  with pytest.raises(ConfigError, match=r"process \(index, count\): \[0, 1\] then, \[0, 2\] now"):
    half.set_state(state)
  del state["layout"]  # written before the settings were recorded: not named, still refused
  with pytest.raises(ConfigError, match="not recorded in this checkpoint"):
    half.set_state(state)


# --- the embedded mixture, tiny build ---------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_config(tmp_path_factory):
  config = get_config("tiny")
  config.data.data_dir = str(tmp_path_factory.mktemp("mm_data"))
  config.data.max_audio_frames = 400
  return config


@pytest.mark.slow
def test_embedded_mixture_builds_on_first_use_and_yields_batches(embedded_config):
  it = pipeline.TrainIterator(embedded_config, data_parallel=8)
  step = next(it)
  assert list(step) == list(ALL_TASKS)
  for name, batch in step.items():
    _check_batch(embedded_config, name, batch, 8)
  counters = it.counters()
  assert all(c["kept"] >= 8 and c["errors"] == 0 for c in counters.values())
  assert os.listdir(os.path.join(pipeline.data_root(embedded_config), "tokenizer"))


def _split_texts(config, name, split, process_index=0, process_count=1):
  task = tasks.resolve(name, "embedded")
  raw = pipeline.read_split(
    config, task, split, file_seed=None, process_index=process_index, process_count=process_count
  )
  key = {"constituency_parsing": "tree", "image_classification": "image"}.get(name, "en")
  return [x[key] for x in tfds.as_numpy(raw)]  # images stay encoded (SkipDecoding)


@pytest.mark.slow
def test_embedded_held_out_is_disjoint_and_hosts_read_disjoint_shards(embedded_config):
  for name in (
    "translate_en_de",
    "translate_en_fr",
    "constituency_parsing",
    "image_classification",
  ):
    train = set(_split_texts(embedded_config, name, "train"))
    held_out = set(_split_texts(embedded_config, name, "test"))
    assert train and held_out and not train & held_out, name
  whole = _split_texts(embedded_config, "translate_en_de", "train")
  shards = [_split_texts(embedded_config, "translate_en_de", "train", i, 2) for i in range(2)]
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(whole)


@pytest.mark.slow
def test_embedded_eval_batches_are_padded_with_references(embedded_config):
  batches = list(pipeline.eval_batches(embedded_config, "translate_de_en", None, data_parallel=8))
  held_out = len(_split_texts(embedded_config, "translate_de_en", "test"))
  assert sum(int(b["raw_valid"].sum()) for b in batches) == held_out
  last = batches[-1]
  assert last["inputs"].shape == (8, embedded_config.data.max_text_length)
  assert (last["targets"][~last["raw_valid"]] == 0).all()
  assert all(isinstance(t, bytes) for t in last["raw_targets"])
  labels = list(pipeline.eval_batches(embedded_config, "image_classification", 1, data_parallel=8))
  assert len(labels) == 1 and labels[0]["targets"].shape == (8,)


def _caches(ds) -> bool:
  policy = tf.data.experimental.ExternalStatePolicy.WARN  # py_function maps hold Python state
  return b"CacheDataset" in ds._as_serialized_graph(external_state_policy=policy).numpy()


@pytest.mark.slow
def test_only_the_endless_training_read_is_cached_in_memory(embedded_config):
  # Held-out reads stop after a few batches: a cache there is filled, then thrown away.
  tokenizer = pipeline.TrainIterator(embedded_config, data_parallel=8).tokenizer
  task = tasks.resolve("translate_de_en", "embedded")
  assert _caches(pipeline.train_dataset(embedded_config, task, tokenizer, 8))
  assert not _caches(pipeline.eval_dataset(embedded_config, task, tokenizer, 8))
