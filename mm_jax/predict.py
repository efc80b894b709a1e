"""Ask a trained MultiModel things: `python -m mm_jax.predict --workdir=DIR --task=NAME INPUT...`.

An input is a sentence (language tasks), an image file (PNG/JPEG) or a WAV file (speech); with
`--batch_file`, one input per line. Prints one output per input: the decoded text or the class.
Inputs go through the same featurisation as training (mm_jax/data/pipeline.py), and the model is
restored from the workdir's newest checkpoint with the run's own config (`config.json`, written by
the trainer) unless `--config` names one. Every user mistake ends in one line on stderr, and every
input is read and checked before the model is built.

Start-up takes most of a call: about 30 s for the tiny model on 2 CPU cores (longer for larger
ones), for importing JAX and TensorFlow, building the model and restoring its checkpoint, and
compiling the decoder. It is paid once a process: give many inputs at once (arguments or
`--batch_file`), and they share one compiled program, 8 inputs a call (16 sentences took 35 s
where one took 28 s).

`load_trained` (the run built from the config, the restored parameters) also serves
`python -m mm_jax.evaluate` and `python -m mm_jax.gallery`.
"""

import dataclasses
import functools
import io
import json
import os
import struct
import sys

import numpy as np
from etils import epath

from mm_jax import cli
from mm_jax.errors import ConfigError

MAX_FILE_BYTES = 50 * 2**20
MAX_IMAGE_PIXELS = 50_000_000
WAV_RATES = (4_000, 192_000)  # sample rates accepted, Hz
WAV_MAX_CHANNELS = 8


class PredictError(Exception):
  """A one-line, user-facing reason why nothing could be predicted."""


# --------------------------------------------------------------------------------------------
# The trained run: config, mesh, model and parameters from a workdir.


def load_config(workdir: str, config=None):
  """The run's config: `config` if given, else the workdir's config.json."""
  import ml_collections

  if not workdir or not workdir.strip():
    raise PredictError("--workdir is empty: name the training run's directory")
  if config is not None:
    return config
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise PredictError(
      f"{path} not found: pass the run's config with --config=configs/multimodel.py:SIZE"
    )
  from mm_jax import validation

  return validation.complete_saved_config(ml_collections.ConfigDict(json.loads(path.read_text())))


@dataclasses.dataclass(frozen=True)
class Trained:
  """A trained run: its static parts (run.Run), the restored parameters and their step."""

  run: object  # mm_jax.run.Run
  params: dict
  step: int
  tokenizer: object  # None when no task of the run has text

  @property
  def config(self):
    return self.run.config

  @property
  def tasks(self) -> dict:
    return self.run.tasks


def checkpoint_dir(workdir: str):
  """The workdir's checkpoints directory; PredictError when it holds none."""
  directory = epath.Path(workdir) / "checkpoints"
  if not directory.is_dir() or not any(d.name.isdigit() for d in directory.iterdir()):
    raise PredictError(f"no checkpoint in {directory}: train first (python -m mm_jax.main)")
  return directory


def load_tokenizer(config):
  """The run's tokenizer (None when no task of the run has text); a damaged file is one line."""
  from mm_jax.data import layout, pipeline

  if not layout.text_task_names(config):
    return None
  try:
    return pipeline.load_or_train_tokenizer(config)
  except ConfigError as error:
    raise PredictError(str(error)) from None


def load_trained(workdir: str, config=None, check_data: bool = False, tokenizer=None) -> Trained:
  """Restores the newest readable checkpoint of `workdir` onto a mesh built from its config.

  `config`: the user's --config (default: the workdir's config.json). `check_data`: check the
  datasets as training does (evaluate and gallery read them; predict reads none). `tokenizer`:
  one already loaded for this config.
  """
  from mm_jax import run as run_lib

  given = config
  config = load_config(workdir, config)
  directory = checkpoint_dir(workdir)
  # One row per data-parallel shard: the parameters' shapes do not depend on the batch.
  try:
    run = run_lib.build(config, rows_per_shard=1, check_data=check_data)
  except ConfigError as error:
    raise PredictError(f"config error: {error}") from None
  step, state = _restore_state(directory, run.sharded_state_specs(), workdir, given)
  tok = tokenizer or load_tokenizer(config)
  return Trained(run, state.params, step, tok)


def _restore_state(directory, target, workdir: str, given_config):
  """(step, state) of the newest checkpoint whose train state reads back and matches its
  checksums; a newer, damaged one is named in one line and left where it is (the trainer moves
  it aside). The data iterator's position is not needed for inference and is not read."""
  from mm_jax import checkpointing

  with checkpointing.Checkpointer(str(directory), keep=1) as ckpt:
    try:
      step, state, _ = ckpt.restore_latest(target, move_aside=False, with_data=False)
    except checkpointing.CheckpointMismatch as error:
      if given_config is None:
        raise PredictError(str(error)) from None
      raise PredictError(
        f"--config does not match the checkpoint in {directory} ({error.difference}"
        f"{_fields_changed(given_config, workdir)}): drop --config to use the run's own "
        "config.json, or pass the config that trained it"
      ) from None
    except (checkpointing.CheckpointReadError, ConfigError) as error:
      raise PredictError(str(error)) from None
  return step, state


def _fields_changed(given, workdir: str) -> str:
  """ "; fields unlike the run's config.json: model.d, ..." (empty without a config.json)."""
  import ml_collections

  from mm_jax import validation

  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    return ""

  def flat(config):
    as_json = ml_collections.ConfigDict(json.loads(config.to_json_best_effort()))
    return dict(validation.leaf_fields(as_json))

  saved, mine = flat(load_config(workdir)), flat(given)
  changed = sorted(k for k in saved.keys() | mine.keys() if saved.get(k) != mine.get(k))
  more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
  return f"; fields unlike the run's config.json: {', '.join(changed[:5])}{more}" if changed else ""


# --------------------------------------------------------------------------------------------
# Inputs: a user's sentence or file -> one example of model arrays.


def _read_file(path: str) -> bytes:
  if not os.path.isfile(path):
    raise PredictError(f"{path}: no such file")
  size = os.path.getsize(path)
  if size > MAX_FILE_BYTES:
    raise PredictError(
      f"{path}: {size / 2**20:.0f} MiB is over the {MAX_FILE_BYTES >> 20} MiB limit"
    )
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as error:
    raise PredictError(f"{path}: cannot read ({error.strerror})") from None


def text_example(config, task, tok, text: str) -> dict:
  """Token ids padded to the task's input length, truncated as the pipeline truncates (EOS kept)."""
  if not text.strip():
    raise PredictError("empty sentence")
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:  # bytes the shell could not decode arrive as lone surrogates
    raise PredictError(f"{text!r} is not UTF-8 text: pass sentences encoded as UTF-8") from None
  from mm_jax.data import layout

  max_len = layout.text_length(config, task.name, "inputs")
  ids = tok.encode(text)
  if len(ids) > max_len:
    print(f"predict: note: input cut to {max_len} tokens", file=sys.stderr)
    ids = ids[: max_len - 1] + [ids[-1]]
  row = np.zeros([max_len], np.int32)
  row[: len(ids)] = ids
  return {"inputs": row}


def image_example(config, task, data: bytes, name: str = "image") -> dict:
  """Decoded, centre-cropped, resized and scaled exactly as in training."""
  import PIL.Image
  import tensorflow as tf

  from mm_jax.data import layout, pipeline

  limit = f"the {MAX_IMAGE_PIXELS:,}-pixel limit: resize it first"
  try:
    with PIL.Image.open(io.BytesIO(data)) as image:  # reads the header only
      width, height = image.size
      if image.format not in ("PNG", "JPEG"):
        raise PredictError(f"{name}: {image.format} image; use PNG or JPEG")
      if width * height > MAX_IMAGE_PIXELS:
        raise PredictError(f"{name}: {width}x{height} pixels is over {limit}")
      image.load()  # decodes, within the limit: a truncated or corrupt file fails here
  except PIL.Image.DecompressionBombError:
    raise PredictError(f"{name}: its header declares an image over {limit}") from None
  except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError):
    raise PredictError(f"{name}: not a readable PNG or JPEG image") from None
  try:
    pixels = pipeline._image(tf.constant(data), layout.image_size(config, task))
  except tf.errors.OpError:
    raise PredictError(f"{name}: not a readable PNG or JPEG image") from None
  return {"inputs": pixels.numpy().astype(np.float32)}


def wav_header(data: bytes, name: str = "audio") -> tuple[int, int, float]:
  """(sample rate, channels, seconds) from a WAV file's RIFF chunks, without decoding it."""
  unreadable = PredictError(f"{name}: not a readable WAV file")
  if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
    raise unreadable
  fmt, data_bytes, pos = None, None, 12
  while pos + 8 <= len(data):
    chunk, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
    if chunk == b"fmt " and size >= 16 and pos + 24 <= len(data):
      fmt = struct.unpack("<HHIIHH", data[pos + 8 : pos + 24])
    elif chunk == b"data":
      data_bytes = min(size, len(data) - pos - 8)
      break
    pos += 8 + size + (size & 1)
  if fmt is None or data_bytes is None:
    raise unreadable
  _, channels, rate, _, block_align, _ = fmt
  if not WAV_RATES[0] <= rate <= WAV_RATES[1]:
    raise PredictError(
      f"{name}: its header says {rate} Hz; use audio sampled at "
      f"{WAV_RATES[0] // 1000}-{WAV_RATES[1] // 1000} kHz"
    )
  if not 1 <= channels <= WAV_MAX_CHANNELS or block_align < 1:
    raise PredictError(f"{name}: its header says {channels} channels; use 1-{WAV_MAX_CHANNELS}")
  return rate, channels, data_bytes / (rate * block_align)


def read_wav(data: bytes, name: str = "audio", max_seconds: float | None = None) -> np.ndarray:
  """Mono int16 samples at 16 kHz from any PCM/float WAV (mixed down and resampled).

  The header is checked first: audio longer than `max_seconds` is refused before any sample is
  decoded or resampled, so memory stays bounded whatever the header claims.
  """
  import scipy.io.wavfile
  import scipy.signal

  from mm_jax.data import features

  _, _, seconds = wav_header(data, name)
  if max_seconds is not None and seconds > max_seconds:
    raise PredictError(
      f"{name}: {seconds:.1f} s of audio is longer than this model's {max_seconds:.2f} s"
    )
  try:
    rate, samples = scipy.io.wavfile.read(io.BytesIO(data))
  except Exception:  # noqa: BLE001 - scipy's reader fails in many ways on a damaged file
    raise PredictError(f"{name}: not a readable WAV file") from None
  samples = np.asarray(samples)
  if samples.dtype.kind == "i":  # PCM: full scale is -(min)
    samples = samples.astype(np.float64) / -float(np.iinfo(samples.dtype).min)
  elif samples.dtype.kind == "u":  # 8-bit PCM is unsigned around 128
    half = (int(np.iinfo(samples.dtype).max) + 1) / 2
    samples = (samples.astype(np.float64) - half) / half
  samples = samples.astype(np.float64)
  if samples.ndim == 2:
    samples = samples.mean(axis=1)
  if rate != features.SAMPLE_RATE:
    divisor = np.gcd(int(rate), features.SAMPLE_RATE)
    samples = scipy.signal.resample_poly(samples, features.SAMPLE_RATE // divisor, rate // divisor)
  return np.clip(np.round(samples * 32767.0), -32768, 32767).astype(np.int16)


def max_audio_seconds(config) -> float:
  """The longest audio the model takes (config.data.max_audio_frames), in seconds."""
  from mm_jax.data import features

  frames = int(config.data.max_audio_frames)
  return features.samples_for_frames(frames) / features.SAMPLE_RATE


def audio_example(config, samples: np.ndarray, name: str = "audio") -> dict:
  """Log-mel frames and mask exactly as in training; over-long audio is refused, not cut."""
  import tensorflow as tf

  from mm_jax.data import features, layout, pipeline

  max_frames = int(config.data.max_audio_frames)
  frames = int(features.num_frames(len(samples)))
  if len(samples) == 0:
    raise PredictError(f"{name}: no audio samples")
  if frames > max_frames:
    seconds = len(samples) / features.SAMPLE_RATE
    limit = max_audio_seconds(config)
    raise PredictError(
      f"{name}: {seconds:.1f} s of audio is longer than this model's {limit:.2f} s "
      f"(config.data.max_audio_frames={max_frames})"
    )
  out = pipeline._audio(tf.constant(samples), max_frames, layout.num_mel_bins(config))
  return {"inputs": out["inputs"].numpy(), "inputs_mask": out["inputs_mask"].numpy()}


def make_example(trained: Trained, task, user_input: str) -> dict:
  return example_for(trained.config, trained.tokenizer, task, user_input)


def example_for(config, tokenizer, task, user_input: str) -> dict:
  """One input as model arrays; needs the config and tokenizer only, not the model."""
  modality = task.signature.input_modality
  if modality == "language":
    example = text_example(config, task, tokenizer, user_input)
  elif modality == "image":
    example = image_example(config, task, _read_file(user_input), user_input)
  else:
    samples = read_wav(_read_file(user_input), user_input, max_audio_seconds(config))
    example = audio_example(config, samples, user_input)
  example["target_space"] = np.int32(task.target_space_id)
  return example


# --------------------------------------------------------------------------------------------
# Prediction: batched, jitted, on the run's mesh.


class Predictor:
  """Decodes (or classifies) lists of examples for any task of a restored run."""

  def __init__(self, trained: Trained, beam_size: int | None = None):
    import jax

    from mm_jax import decode

    self.trained = trained
    self._decode = decode.jit_decoder(trained.run.model, trained.config.decode, beam_size)
    self._classify = jax.jit(self._classify_fn, static_argnames="signature")
    self.rows = sharding_rows(trained.run)

  def _classify_fn(self, params, batch, signature):
    def logits_of(module):
      encoded, mask, _ = module.encode(batch, signature, train=False)
      return module.decode(encoded, mask, None, None, signature, train=False)[0]

    return self.trained.run.model.apply({"params": params}, method=logits_of)

  def outputs(self, task_name: str, examples: list[dict]) -> list[str]:
    """One output string per example: decoded text, or the class (name when known)."""
    task = self.trained.tasks[task_name]
    raw = self.raw_outputs(task_name, examples)
    if task.signature.target_modality == "categorical":
      names = class_names(self.trained.config, task)
      return [names[int(np.argmax(row))] for row in raw]
    return [self.detokenize(ids) for ids in raw]

  def raw_outputs(self, task_name: str, examples: list[dict]):
    """Token id lists (language) or logits rows (categorical), one per example."""
    task = self.trained.tasks[task_name]
    out = []
    for start in range(0, len(examples), self.rows):
      chunk = examples[start : start + self.rows]
      out += self._device_outputs(task, chunk)[: len(chunk)]
    return out

  def _device_outputs(self, task, chunk):
    import jax

    from mm_jax import decode, sharding

    padded = chunk + [_zeros_like(chunk[0])] * (self.rows - len(chunk))
    arrays = {k: np.stack([ex[k] for ex in padded]) for k in chunk[0]}
    signature = task.signature
    with self.trained.run.activate():
      batch = sharding.global_batch(arrays, self.trained.run.mesh)
      if signature.target_modality == "categorical":
        logits = self._classify(self.trained.params, batch, signature=signature)
        return list(np.asarray(jax.device_get(logits)))
      tokens = self._decode(self.trained.params, batch, signature=signature)
    return decode.strip_after_eos(tokens)

  def detokenize(self, ids) -> str:
    tok = self.trained.tokenizer
    return tok.decode([i for i in ids if i < tok.vocab_size])


def sharding_rows(run, at_least: int = 8) -> int:
  """Rows per device batch: a multiple of the data-parallel size, one compile per task."""
  from mm_jax import sharding

  ways = sharding.data_parallel_size(run.mesh)
  return ways * max(1, -(-at_least // ways))


def _zeros_like(example: dict) -> dict:
  return {k: np.zeros_like(v) for k, v in example.items()}


@functools.lru_cache(maxsize=16)
def _class_names_cached(tfds_name: str, data_dir: str, num_classes: int) -> tuple[str, ...]:
  import tensorflow_datasets as tfds

  try:
    names = tfds.builder(tfds_name, data_dir=data_dir).info.features["label"].names
  except Exception:  # noqa: BLE001 - builders without names fall back to ids
    names = None
  if not names or len(names) != num_classes:
    return tuple(str(i) for i in range(num_classes))
  return tuple(names)


def class_names(config, task) -> tuple[str, ...]:
  from mm_jax.data import pipeline

  return _class_names_cached(
    task.source.tfds_name, pipeline.tfds_data_dir(config), task.signature.num_classes
  )


# --------------------------------------------------------------------------------------------
# The command.


def define_flags(values):
  from absl import flags
  from ml_collections import config_flags

  def string(name, help_text, required=False):
    flags.DEFINE_string(name, None, help_text, required=required, flag_values=values)

  string("workdir", "the training run's directory", required=True)
  string("task", "task name, as in the run's config.data.tasks", required=True)
  string("batch_file", "a file with one input (sentence or path) per line")
  flags.DEFINE_integer("beam_size", None, "override config.decode.beam_size", flag_values=values)
  config_flags.DEFINE_config_file(
    "config", None, "config (default: the workdir's config.json)", flag_values=values
  )


def _task(config, name: str):
  """The run's task `name`, its config checked first (the tasks follow from it)."""
  import jax

  from mm_jax import validation
  from mm_jax.data import layout

  try:
    validation.validate(config, jax.device_count(), check_data=False)
  except ConfigError as error:
    raise PredictError(f"config error: {error}") from None
  tasks = layout.build_tasks(config)
  if name not in tasks:
    raise PredictError(f"unknown task {name!r}: this run has {', '.join(tasks)}")
  return tasks[name]


def inputs_from(argv_inputs: list[str], batch_file: str | None) -> list[str]:
  inputs = list(argv_inputs)
  if batch_file:
    text = _read_file(batch_file).decode("utf-8", "replace")
    inputs += [line.strip() for line in text.splitlines() if line.strip()]
  if not inputs:
    raise PredictError("nothing to predict: give inputs as arguments or --batch_file")
  return inputs


def main(argv, values=None):
  from absl import flags, logging

  values = values or flags.FLAGS
  logging.set_verbosity(logging.WARNING)  # the checkpoint library's INFO lines say nothing here
  cli.check_at_least("predict", values, "beam_size", 1)
  given = cli.config_or_exit(values["config"], "predict")
  try:
    inputs = inputs_from(argv[1:], values.batch_file)
    config = load_config(values.workdir, given)
    checkpoint_dir(values.workdir)
    task = _task(config, values.task)
    # Every input is read and checked before the model is built and restored (most of the
    # start-up): a bad one is refused in seconds.
    tokenizer = load_tokenizer(config) if task.signature.input_modality == "language" else None
    examples = [example_for(config, tokenizer, task, x) for x in inputs]
    trained = load_trained(values.workdir, given, tokenizer=tokenizer)
    outputs = Predictor(trained, values.beam_size).outputs(values.task, examples)
  except PredictError as error:
    cli.fail("predict", str(error))
  for output in outputs:
    print(output, flush=True)


if __name__ == "__main__":
  from mm_jax import backend

  backend.start_command(__name__)  # JAX and TensorFlow are imported only once main runs
  cli.start(define_flags, main)
