"""tf.data per task, mixing into one dict of batches per step, and resumable iterator state.

Per task: read this host's shard of the TFDS split (files shuffled with a fixed seed), shuffle,
repeat, decode and featurise (image resize to [-1, 1], log-mel, sentencepiece ids), cut to the
configured static shapes, batch, prefetch. Nothing is dropped silently: every example carries
cumulative counters (seen, kept, errors, empty, too_long, truncated) to the batch, and
TrainIterator.counters() exposes the latest per task. Records that fail to decode are skipped by a
per-record `ignore_errors` (a failing reader stays fatal) and counted as errors.

The pipeline is a pure function of (config, seed, process), so iterator state is the number of
examples consumed per task: a resumed iterator replays the same pipeline, skips that many examples
and batches the rest, giving exactly the batches the first run would have seen next, or, under a
changed mixture (mm_jax/mixture.py), the same examples in batches of the new size.
"""

import zlib
from collections.abc import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from mm_jax import mixture
from mm_jax.data import features, layout
from mm_jax.data import tasks as tasks_lib
from mm_jax.data import tokenizer as tokenizer_lib
from mm_jax.data.layout import data_root, mixture_key, tfds_data_dir  # noqa: F401 (callers' names)
from mm_jax.data.prepare import ensure_prepared

STATS = ("seen", "kept", "errors", "empty", "too_long", "truncated")
_TOKENIZE_CHUNK = 128
# A pipeline that keeps nothing would spin forever behind repeat(); fail loudly instead.
MAX_CONSECUTIVE_DROPS = 5000
_AUTOTUNE = tf.data.AUTOTUNE
# tf.data traces the functions below as written: they branch on Python values only (tf.cond where
# a tensor decides), so autograph's source rewrite is not needed. It cost ~4 s of the first batch.
_as_written = tf.autograph.experimental.do_not_convert

# TensorFlow only feeds data: keep it off any accelerator JAX is using. (Only possible before its
# first op; a process that ran one before importing this module keeps the devices it had.)
try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError as error:
  logging.warning("TensorFlow keeps its GPUs: %s", error)


# --- config -> paths (tasks, batch sizes, shapes: layout.py) ----------------------------------


def _task_seed(config, name: str, process_index: int) -> int:
  return zlib.crc32(f"{config.data.seed}/{name}/{process_index}".encode()) & 0x7FFFFFFF


# --- reading TFDS ---------------------------------------------------------------------------


def builder(config, task: tasks_lib.Task):
  ensure_prepared(config)
  source = task.source
  b = tfds.builder(source.tfds_name, data_dir=tfds_data_dir(config))
  if not b.is_prepared():
    manual_dir = config.data[source.manual_dir_field] if source.manual_dir_field else None
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
      b.download_and_prepare(download_config=download_config)
    except Exception as e:  # noqa: BLE001  (re-raised with the fix)
      raise RuntimeError(
        f"{source.tfds_name} is not prepared under {tfds_data_dir(config)} and could not be "
        f"built here ({type(e).__name__}: {e}). Prepare it with `tfds build {source.tfds_name} "
        f"--data_dir=...` where the data is reachable and set config.data.data_dir"
      ) from e
  return b


def read_split(
  config,
  task: tasks_lib.Task,
  split: str,
  *,
  file_seed: int | None,
  process_index: int = 0,
  process_count: int = 1,
  text_only: bool = False,
  autocache: bool = False,
) -> tf.data.Dataset:
  """This host's share of a split, raw (images left encoded).

  `autocache`: let TFDS keep a small split in memory as it is first read. Only the endless
  training read gains (every later epoch comes from memory); a read that stops early (held-out
  batches, the tokenizer's sentences) would fill a cache that tf.data then discards, with a
  warning at every such stop.
  """
  b = builder(config, task)
  if process_count > 1:
    split = tfds.split_for_jax_process(
      split, process_index=process_index, process_count=process_count
    )
  decoders = None
  if text_only and task.source.text_features:
    decoders = tfds.decode.PartialDecoding({k: True for k in task.source.text_features})
  elif task.signature.input_modality == "image":
    decoders = {"image": tfds.decode.SkipDecoding()}
  options = tf.data.Options()
  options.deterministic = True
  read_config = tfds.ReadConfig(shuffle_seed=file_seed, options=options, try_autocache=autocache)
  return b.as_dataset(
    split=split, shuffle_files=file_seed is not None, decoders=decoders, read_config=read_config
  )


# --- per-example processing -----------------------------------------------------------------


def _image(encoded_or_pixels: tf.Tensor, size: int) -> tf.Tensor:
  """Centre square crop, resize, scale to [-1, 1]; grayscale becomes 3 equal channels."""
  if encoded_or_pixels.dtype == tf.string:
    image = tf.io.decode_image(encoded_or_pixels, channels=3, expand_animations=False)
  else:
    image = encoded_or_pixels
    image = tf.cond(
      tf.shape(image)[-1] == 1, lambda: tf.image.grayscale_to_rgb(image), lambda: image[..., :3]
    )
  image.set_shape([None, None, 3])
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  side = tf.minimum(height, width)
  image = tf.image.crop_to_bounding_box(
    image, (height - side) // 2, (width - side) // 2, side, side
  )
  image = tf.image.resize(image, [size, size], antialias=True)
  return tf.clip_by_value(image / 127.5 - 1.0, -1.0, 1.0)


def _audio(samples: tf.Tensor, max_frames: int, num_mel_bins: int) -> dict:
  num_samples = tf.shape(samples)[0]
  frames = features.num_frames(num_samples)
  cropped = samples[: features.samples_for_frames(max_frames)]
  mel = features.log_mel(cropped, num_mel_bins)
  length = tf.shape(mel)[0]
  mel = tf.pad(mel, [[0, max_frames - length], [0, 0]])
  mel.set_shape([max_frames, num_mel_bins])
  return {
    "inputs": mel,
    "inputs_mask": tf.cast(tf.range(max_frames) < length, tf.float32),
    "_empty": num_samples == 0,
    "_too_long": frames > max_frames,
  }


def _featurize(config, task, seed: int):
  """(index, raw example) -> model fields plus flags; may raise on corrupt records."""
  modality = task.signature.input_modality

  def fn(index, raw):
    fields = task.source.adapter(raw, tf.stack([tf.constant(seed, tf.int64), index]))
    out = {"_index": index, "_empty": tf.constant(False), "_too_long": tf.constant(False)}
    if modality == "image":
      out["inputs"] = _image(fields["image"], layout.image_size(config, task))
    elif modality == "audio":
      out.update(
        _audio(fields["speech"], int(config.data.max_audio_frames), layout.num_mel_bins(config))
      )
    if "label" in fields:
      out["targets"] = tf.cast(fields["label"], tf.int32)
    for key in ("input_text", "target_text"):
      if key in fields:
        out[key] = tf.reshape(tf.cast(fields[key], tf.string), [])
    return out

  return fn


def _tokenize_chunk(config, task, tokenizer):
  """A chunk of examples -> ids padded to the task's text lengths, plus the text as encoded."""
  keys = [k for k in ("input_text", "target_text") if _has_text(task, k)]
  fields = ["inputs" if k == "input_text" else "targets" for k in keys]
  max_lens = [layout.text_length(config, task.name, field) for field in fields]
  text_fn = task.source.text_fn

  def py(*texts):
    texts = [[t.decode("utf-8", "replace") for t in column] for column in texts]
    n = len(texts[0])
    error = np.zeros([n], bool)
    if text_fn is not None:
      for i in range(n):
        pair = [texts[keys.index(k)][i] if k in keys else "" for k in ("input_text", "target_text")]
        try:
          new_input, new_target = text_fn(pair[0], pair[1], config.data)
        except ValueError:
          new_input, new_target, error[i] = "", "", True
        for k, v in (("input_text", new_input), ("target_text", new_target)):
          if k in keys:
            texts[keys.index(k)][i] = v
    outputs = [error]
    for column, max_len in zip(texts, max_lens):
      ids = np.zeros([n, max_len], np.int32)
      lengths = np.zeros([n], np.int32)
      for i, row in enumerate(tokenizer.encode_batch(column)):
        lengths[i] = len(row) if column[i].strip() else 0
        row = row if len(row) <= max_len else row[: max_len - 1] + [tokenizer_lib.EOS_ID]
        ids[i, : len(row)] = row
      outputs += [ids, lengths, np.array([t.encode("utf-8") for t in column], object)]
    return outputs

  def fn(chunk):
    types = [tf.bool] + [tf.int32, tf.int32, tf.string] * len(keys)
    results = tf.numpy_function(py, [chunk[k] for k in keys], types, stateful=False)
    out = {k: v for k, v in chunk.items() if k not in keys}
    out["_error"] = tf.ensure_shape(results[0], [None])
    empty, over = tf.zeros_like(out["_error"]), tf.zeros_like(out["_error"])
    for j, (field, max_len) in enumerate(zip(fields, max_lens)):
      ids, lengths, text = results[1 + 3 * j : 4 + 3 * j]
      out[field] = tf.ensure_shape(ids, [None, max_len])
      out[f"raw_{field}"] = tf.ensure_shape(text, [None])
      lengths = tf.ensure_shape(lengths, [None])
      empty |= lengths == 0
      over |= lengths > max_len
    out["_empty"] = out["_empty"] | empty
    if config.data.text_overlength == "drop":
      out["_too_long"] = out["_too_long"] | over
      out["_truncated"] = tf.zeros_like(over)
    else:
      out["_truncated"] = over
    return out

  return fn


def _has_text(task, key: str) -> bool:
  sig = task.signature
  return (
    sig.input_modality == "language" if key == "input_text" else sig.target_modality == ("language")
  )


def _count(state, ex):
  """Cumulative counters. A record that failed to decode never arrives here: it shows as an
  index seen (the highest index so far) without an element, so errors = seen - arrived."""
  flags, seen, arrived, last_kept = state
  index = ex["_index"]
  kept = ~(ex["_error"] | ex["_empty"] | ex["_too_long"])
  new = [ex["_error"], ex["_empty"], ex["_too_long"], ex["_truncated"] & kept, kept]
  flags = flags + tf.stack([tf.cast(f, tf.int64) for f in new])
  seen = tf.maximum(seen, index + 1)
  arrived = arrived + 1
  last_kept = tf.where(kept, tf.maximum(last_kept, index), last_kept)
  check = tf.debugging.assert_less(
    seen - 1 - last_kept,
    tf.constant(MAX_CONSECUTIVE_DROPS, tf.int64),
    message="input pipeline dropped every recent example (see its counters): check the data "
    "and config.data.max_text_length / max_audio_frames",
  )
  with tf.control_dependencies([check]):
    seen = tf.identity(seen)
  errors, empty, too_long, truncated, kept_total = tf.unstack(flags)
  counts = tf.stack([seen, kept_total, errors + seen - arrived, empty, too_long, truncated])
  out = {k: v for k, v in ex.items() if not k.startswith("_")}
  out["_kept"] = kept
  out["_stats"] = counts
  return (flags, seen, arrived, last_kept), out


def examples(config, task, tokenizer, raw: tf.data.Dataset, *, seed: int) -> tf.data.Dataset:
  """Raw records -> kept, featurised examples with cumulative `_stats` (deterministic order).

  Each record is featurised in its own one-element dataset so `ignore_errors` covers exactly
  that record's decoding: a corrupt image is dropped and counted, a failing reader stays fatal.
  """
  featurize = _as_written(_featurize(config, task, seed))

  def one_record(index, record):
    return tf.data.Dataset.from_tensors((index, record)).map(featurize).ignore_errors()

  ds = raw.enumerate().interleave(
    _as_written(one_record),
    cycle_length=8,
    block_length=1,
    num_parallel_calls=_AUTOTUNE,
    deterministic=True,
  )
  if _has_text(task, "input_text") or _has_text(task, "target_text"):
    ds = ds.batch(_TOKENIZE_CHUNK).map(
      _as_written(_tokenize_chunk(config, task, tokenizer)),
      num_parallel_calls=_AUTOTUNE,
      deterministic=True,
    )
    ds = ds.unbatch()
  else:
    ds = ds.map(
      _as_written(lambda ex: dict(ex, _error=tf.constant(False), _truncated=tf.constant(False)))
    )
  zero = tf.constant(0, tf.int64)
  initial = (tf.zeros([5], tf.int64), zero, zero, tf.constant(-1, tf.int64))
  ds = ds.scan(initial, _as_written(_count))
  ds = ds.filter(_as_written(lambda ex: ex["_kept"]))
  target_space = tf.constant(task.target_space_id, tf.int32)
  return ds.map(_as_written(lambda ex: dict(_without(ex, "_kept"), target_space=target_space)))


def _without(ex: dict, *keys: str) -> dict:
  return {k: v for k, v in ex.items() if k not in keys}


def _shuffle_buffer(config, task) -> int:
  # Decoded audio is large (a 15 s clip is ~0.5 MB): a tenth of the buffer keeps memory sane.
  buffer = int(config.data.shuffle_buffer)
  return max(buffer // 10, 1) if task.signature.input_modality == "audio" else buffer


def train_dataset(
  config,
  task,
  tokenizer,
  batch_size: int,
  *,
  process_index: int = 0,
  process_count: int = 1,
  skip_examples: int = 0,
) -> tf.data.Dataset:
  """Endless, seeded, host-sharded batches of static shape; `_stats` rides along. The first
  `skip_examples` kept examples are read and passed over (a resumed position)."""
  seed = _task_seed(config, task.name, process_index)
  raw = read_split(
    config,
    task,
    task.source.train_split,
    file_seed=seed,
    process_index=process_index,
    process_count=process_count,
    autocache=True,
  )
  raw = raw.shuffle(_shuffle_buffer(config, task), seed=seed, reshuffle_each_iteration=True)
  ds = examples(config, task, tokenizer, raw.repeat(), seed=seed)
  ds = ds.map(_as_written(lambda ex: {k: v for k, v in ex.items() if not k.startswith("raw_")}))
  if skip_examples:
    ds = ds.skip(skip_examples)
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.prefetch(_AUTOTUNE)


def eval_dataset(
  config, task, tokenizer, batch_size: int, *, process_index: int = 0, process_count: int = 1
) -> tf.data.Dataset:
  """One pass over the held-out split in file order, with raw_* reference text kept."""
  raw = read_split(
    config,
    task,
    task.source.eval_split,
    file_seed=None,
    process_index=process_index,
    process_count=process_count,
  )
  ds = examples(config, task, tokenizer, raw, seed=_task_seed(config, task.name, 0))
  ds = ds.map(_as_written(lambda ex: _without(ex, "_stats")))
  return ds.batch(batch_size).prefetch(_AUTOTUNE)


# --- the public iterators -------------------------------------------------------------------


def _split_stats(batch: dict) -> tuple[dict, dict]:
  stats = batch.pop("_stats")
  return batch, dict(zip(STATS, (int(x) for x in stats[-1]), strict=True))


class TrainIterator:
  """dict[task -> process-local batch] per step, every task every step; resumable."""

  def __init__(
    self,
    config,
    process_index: int = 0,
    process_count: int = 1,
    *,
    data_parallel: int | None = None,
    tokenizer: tokenizer_lib.Tokenizer | None = None,
    tasks: dict[str, tasks_lib.Task] | None = None,
    read_layout: layout.ReadLayout | None = None,
  ):
    """`tasks` and `read_layout` (what the run builder made: run.tasks, run.read_layout(...))
    replace deriving them again from the config; `read_layout` then gives the process index,
    count and batch sizes."""
    self.config = config
    self.tasks = tasks if tasks is not None else layout.build_tasks(config)
    if read_layout is None:
      dp = data_parallel or layout.data_parallel_from_config(config)
      read_layout = layout.read_layout(
        config, mixture.local_batch_sizes(config, dp, process_count), process_index, process_count
      )
    self.layout = read_layout
    self.process_index, self.process_count = read_layout.process_index, read_layout.process_count
    self.batch_sizes = self.layout.batch_sizes
    self._tokenizer = tokenizer
    self._consumed = {name: 0 for name in self.tasks}  # examples
    self._batches = {name: 0 for name in self.tasks}
    self._counters = {name: dict.fromkeys(STATS, 0) for name in self.tasks}
    self._iterators: dict[str, Iterator] | None = None

  @property
  def tokenizer(self) -> tokenizer_lib.Tokenizer | None:
    """Loaded (or trained) on first use; None when no selected task has text."""
    if self._tokenizer is None and layout.text_task_names(self.config):
      self._tokenizer = load_or_train_tokenizer(self.config)
    return self._tokenizer

  def _start(self) -> dict[str, Iterator]:
    return {
      name: train_dataset(
        self.config,
        task,
        self.tokenizer,
        self.batch_sizes[name],
        process_index=self.process_index,
        process_count=self.process_count,
        skip_examples=self._consumed[name],
      ).as_numpy_iterator()
      for name, task in self.tasks.items()
    }

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, dict[str, np.ndarray]]:
    if self._iterators is None:
      self._iterators = self._start()
    step = {}
    for name, iterator in self._iterators.items():
      step[name], self._counters[name] = _split_stats(next(iterator))
      self._consumed[name] += self.batch_sizes[name]
      self._batches[name] += 1
    return step

  def counters(self) -> dict[str, dict[str, int]]:
    """Per task: records seen, kept, and dropped (errors/empty/too_long) or truncated so far."""
    return {name: dict(c) for name, c in self._counters.items()}

  def get_state(self) -> dict:
    return {
      "version": 2,
      "fingerprint": self.layout.fingerprint(),
      "layout": self.layout.describe(),  # names what changed when a resume does not match
      "examples": dict(self._consumed),  # the position: what a resumed reader skips
      "batches": dict(self._batches),  # batches read, at whatever sizes they had
      "counters": self.counters(),
    }

  def set_state(self, state: dict) -> None:
    self._consumed = self.layout.examples_consumed(state)
    self._batches = {name: int(n) for name, n in state["batches"].items()}
    self._counters = {name: dict(c) for name, c in state.get("counters", {}).items()}
    self._iterators = None


def eval_batches(
  config,
  task_name: str,
  num_batches: int | None = None,
  *,
  process_index: int = 0,
  process_count: int = 1,
  data_parallel: int | None = None,
  tokenizer: tokenizer_lib.Tokenizer | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Held-out batches in a fixed order, the last one padded; `raw_valid` marks real rows.

  Padding rows are all zeros (targets 0 = pad, so token losses ignore them); categorical metrics
  should weight by `raw_valid`. Language tasks carry `raw_inputs` / `raw_targets` text (bytes).
  """
  task = layout.build_tasks(config)[task_name]
  dp = data_parallel or layout.data_parallel_from_config(config)
  batch_size = mixture.local_batch_sizes(config, dp, process_count)[task_name]
  if tokenizer is None and task_name in layout.text_task_names(config):
    tokenizer = load_or_train_tokenizer(config)
  ds = eval_dataset(
    config,
    task,
    tokenizer,
    batch_size,
    process_index=process_index,
    process_count=process_count,
  )
  for i, batch in enumerate(ds.as_numpy_iterator()):
    if num_batches is not None and i >= num_batches:
      return
    yield _pad_batch(batch, batch_size)


def _pad_batch(batch: dict, batch_size: int) -> dict:
  n = len(batch["target_space"])
  out = {}
  for key, value in batch.items():
    pad = np.zeros((batch_size - n, *value.shape[1:]), value.dtype)
    if value.dtype == object:
      pad[...] = b""
    out[key] = np.concatenate([value, pad])
  out["raw_valid"] = np.arange(batch_size) < n
  return out


# --- tokenizer training text ----------------------------------------------------------------


def load_or_train_tokenizer(config) -> tokenizer_lib.Tokenizer:
  """The mixture's tokenizer from data_dir/tokenizer/, trained there on first use."""
  text_tasks = layout.text_task_names(config)
  vocab_size = int(config.data.tokenizer_vocab_size)
  path = tokenizer_lib.model_path(data_root(config), mixture_key(config), vocab_size, text_tasks)
  if epath.Path(path).exists():
    return tokenizer_lib.load(path)
  texts = tokenizer_training_text(config)
  trees = [t for t in texts if t.startswith("(")]
  symbols = tokenizer_lib.tree_symbols(trees, vocab_size)
  tokenizer = tokenizer_lib.train(texts, vocab_size, user_symbols=symbols)
  tokenizer_lib.save(tokenizer, path)
  return tokenizer


def tokenizer_training_text(config) -> list[str]:
  """Every text field of the selected text tasks' train splits (capped per dataset)."""
  limit = int(config.data.tokenizer_sentences_per_task)
  texts, seen_sources = [], set()
  for name in layout.text_task_names(config):
    task = layout.build_tasks(config)[name]
    if task.source.tfds_name in seen_sources:
      continue  # both directions of a language pair read the same dataset
    seen_sources.add(task.source.tfds_name)
    raw = read_split(config, task, task.source.train_split, file_seed=None, text_only=True)
    seed = tf.constant([0, 0], tf.int64)

    def text_of(ex, task=task, seed=seed):
      fields = task.source.adapter(ex, seed)
      return {k: fields[k] for k in ("input_text", "target_text") if k in fields}

    for fields in raw.take(limit).map(_as_written(text_of)).as_numpy_iterator():
      pair = [fields.get(k, b"").decode("utf-8", "replace") for k in ("input_text", "target_text")]
      if task.source.text_fn is not None:
        try:
          pair = list(task.source.text_fn(pair[0], pair[1], config.data))
        except ValueError:
          continue
      texts += [t for t in pair if t.strip()]
  return texts
