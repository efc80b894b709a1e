"""Config checks that run before anything is built or compiled.

Each failure is a `ConfigError` whose message is one line: the field, the bad value, the fix.
"""

import dataclasses
import importlib
import math
import os
import uuid
from collections.abc import Callable
from typing import Any

from etils import epath

from mm_jax import sharding
from mm_jax.errors import ConfigError

_DTYPES = ("float32", "bfloat16")
# config.model.dtype (activations) and config.model.kernels: "auto" is decided by run.build from
# the run's devices (run.model_config).
ACTIVATION_DTYPES = ("auto", *_DTYPES)
KERNELS = ("auto", "cpu", "xla", "tpu")
# Generators config.train.init_prng_impl may name; the first is the default.
INIT_PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


# Fields added to the config after runs were already saved, each with the behaviour runs had
# before it existed: a workdir's config.json from then still loads (predict, evaluate, gallery).
# Everywhere else fields are read strictly: a default there would hide a misspelt name.
FIELDS_ADDED_LATER = {
  "model.audio_stem_stride": 1,
  "model.audio_ctc_weight": 0.0,
  "model.pack_groups": False,
  "model.moe.eval_drops": False,
  "model.kernels": "cpu",
  "model.remat": "none",
  "optimizer.flatten": False,
  "train.microbatches": 1,
  "train.init_prng_impl": INIT_PRNG_IMPLS[0],
  "train.inject_nonfinite_steps": (),
  "train.loss_weights": {},
  "data.text_overlength": "truncate",
  "data.tokenizer_sentences_per_task": 100_000,
  "data.parse_pos_tags": "keep",
  "data.input_lengths": {},
  "data.target_lengths": {},
  "data.mixing": {"strategy": "weights", "temperature": 2.0, "max_examples": 0},
  "train.expert_load": False,
  "mesh_rules": sharding.rules_config(),
}


def complete_saved_config(config):
  """Adds the FIELDS_ADDED_LATER a saved config lacks, in place; returns it."""
  import ml_collections

  for path, value in FIELDS_ADDED_LATER.items():
    *parents, field = path.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    if field not in node:
      with node.unlocked():
        node[field] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  return config


def _require(condition: bool, message: str):
  if not condition:
    raise ConfigError(message)


def _is_number(value) -> bool:
  """int or float, but not bool (a bool is an int to isinstance, and no weight or fraction).

  Float fields of a ConfigDict turn True into 1.0 on assignment; this catches fields without a
  declared type (a task's loss weight added by a config file, a field set to None)."""
  return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# One rule for every field of the config: what a value must be on its own. Rules that tie fields
# together (divisibility, the mesh, the batch split) follow in the _validate_* functions below.
# tests/test_config_errors.py walks every field of every config variant and fails on a field
# without a rule here, so a new field cannot go unchecked.


@dataclasses.dataclass(frozen=True)
class Rule:
  ok: Callable[[Any], bool]
  use: str  # the fix, as in "config.model.d=0: use a positive integer"


def _finite(value) -> bool:
  return _is_number(value) and math.isfinite(value)


def _choice(*choices) -> Rule:
  return Rule(lambda v: v in choices, f"one of {', '.join(map(repr, choices))}")


def _choice_of(module: str, name: str) -> Rule:
  """One of a tuple a model or data module defines: imported when a value is checked, so that
  this table does not import the model code."""

  def choices():
    return getattr(importlib.import_module(module), name)

  return Rule(lambda v: v in choices(), f"one of {module}.{name}")


def _conv_steps(value) -> bool:
  return (
    isinstance(value, tuple | list)
    and len(value) > 0
    and all(len(s) == 2 and all(_is_int(v) and v > 0 for v in s) for s in value)
  )


def _target_spaces(value) -> bool:
  from mm_jax.data import tasks

  return tuple(value) == tasks.TARGET_SPACES


POSITIVE_INT = Rule(lambda v: _is_int(v) and v > 0, "a positive integer")
COUNT = Rule(lambda v: _is_int(v) and v >= 0, "an integer >= 0")
INTEGER = Rule(_is_int, "an integer")
BOOL = Rule(lambda v: isinstance(v, bool), "True or False")
FRACTION = Rule(lambda v: _is_number(v) and 0 <= v < 1, "a value in [0, 1)")
POSITIVE = Rule(lambda v: _finite(v) and v > 0, "a finite positive number")
NON_NEGATIVE = Rule(lambda v: _finite(v) and v >= 0, "a finite number >= 0")
DIRECTORY = Rule(lambda v: v is None or (isinstance(v, str) and bool(v.strip())), "a directory")
CONV_STEPS = Rule(_conv_steps, "((kernel, dilation), ...) of positive integers")
MESH_AXIS = Rule(lambda v: _is_int(v) and (v > 0 or v == -1), "a positive size or -1 to fill")
MESH_RULE = Rule(lambda v: isinstance(v, str), "mesh axis names joined by commas ('' replicates)")

FIELD_RULES: dict[str, Rule] = {
  "seed": INTEGER,
  "mesh.*": MESH_AXIS,
  "mesh_rules.*": MESH_RULE,
  # The model.
  "model.d": POSITIVE_INT,
  "model.num_heads": POSITIVE_INT,
  "model.dropout": FRACTION,
  "model.conv_group1": CONV_STEPS,
  "model.conv_group2": CONV_STEPS,
  "model.attention_query_convs": CONV_STEPS,
  "model.encoder_blocks_before_ffn": COUNT,
  "model.encoder_blocks_after_ffn": COUNT,
  "model.decoder_blocks_before_ffn": COUNT,
  "model.decoder_blocks_after_ffn": COUNT,
  "model.use_attention": BOOL,
  "model.pack_groups": BOOL,
  "model.ffn": _choice("moe", "dense"),
  "model.dense_ffn_hidden": POSITIVE_INT,
  "model.target_spaces": Rule(_target_spaces, "the tasks' output spaces, in mm_jax/data/tasks.py"),
  "model.vocab_size": Rule(lambda v: _is_int(v) and v >= 8, "an integer >= 8"),
  "model.image_channels": Rule(lambda v: v == 3, "3 (images are decoded as RGB)"),
  "model.audio_num_mel_bins": POSITIVE_INT,
  "model.audio_blocks": POSITIVE_INT,
  "model.audio_stem_stride": POSITIVE_INT,
  "model.audio_ctc_weight": Rule(
    lambda v: _finite(v) and v >= 0, "a number >= 0 (0 turns the CTC loss off)"
  ),
  "model.dtype": Rule(
    lambda v: v in ACTIVATION_DTYPES, f"one of {ACTIVATION_DTYPES} ('auto': by the devices)"
  ),
  "model.remat": _choice_of("mm_jax.models.multimodel", "REMAT_MODES"),
  "model.param_dtype": _choice(*_DTYPES),
  "model.kernels": Rule(lambda v: v in KERNELS, f"one of {KERNELS} ('auto': by the devices)"),
  "model.moe.num_experts": POSITIVE_INT,
  "model.moe.k": POSITIVE_INT,
  "model.moe.hidden": POSITIVE_INT,
  "model.moe.capacity_factor_train": POSITIVE,
  "model.moe.capacity_factor_eval": POSITIVE,
  "model.moe.group_size": POSITIVE_INT,
  "model.moe.noisy_gating": BOOL,
  "model.moe.balance_loss": _choice_of("mm_jax.models.moe", "BALANCE_LOSSES"),
  "model.moe.balance_coef": NON_NEGATIVE,
  "model.moe.z_loss_coef": NON_NEGATIVE,
  "model.moe.dispatch": _choice_of("mm_jax.models.moe", "DISPATCHES"),
  "model.moe.eval_drops": BOOL,
  # The data.
  "data.mixture": _choice("embedded", "paper"),
  "data.tasks": Rule(lambda v: isinstance(v, str), "task names joined by commas"),
  "data.data_dir": DIRECTORY,
  "data.embedded_scale": _choice_of("mm_jax.data.layout", "EMBEDDED_SCALES"),
  "data.global_batch_size": POSITIVE_INT,
  "data.weights.*": NON_NEGATIVE,
  "data.mixing.strategy": _choice_of("mm_jax.mixture", "STRATEGIES"),
  "data.mixing.temperature": Rule(
    lambda v: _finite(v) and v > 0, "a number > 0 (1: by examples; 2 or 3 is usual)"
  ),
  "data.mixing.max_examples": Rule(lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: no cap)"),
  "data.max_text_length": POSITIVE_INT,
  "data.input_lengths.*": POSITIVE_INT,
  "data.target_lengths.*": POSITIVE_INT,
  "data.max_audio_frames": POSITIVE_INT,
  "data.image_size": POSITIVE_INT,
  "data.caption_image_size": POSITIVE_INT,
  "data.shuffle_buffer": POSITIVE_INT,
  "data.tokenizer_vocab_size": Rule(lambda v: _is_int(v) and v >= 8, "an integer >= 8"),
  "data.tokenizer_sentences_per_task": POSITIVE_INT,
  "data.text_overlength": _choice_of("mm_jax.data.layout", "TEXT_OVERLENGTH"),
  "data.parse_pos_tags": _choice_of("mm_jax.data.layout", "PARSE_POS_TAGS"),
  "data.ptb_dir": DIRECTORY,
  "data.seed": INTEGER,
  # The optimizer.
  "optimizer.learning_rate": POSITIVE,
  "optimizer.warmup_steps": COUNT,
  "optimizer.decay": _choice("rsqrt", "cosine", "wsd", "constant"),
  "optimizer.cooldown_fraction": Rule(lambda v: _is_number(v) and 0 <= v <= 1, "a value in [0, 1]"),
  "optimizer.b1": FRACTION,
  "optimizer.b2": FRACTION,
  "optimizer.eps": POSITIVE,
  "optimizer.grad_clip_norm": POSITIVE,
  "optimizer.weight_decay": NON_NEGATIVE,
  "optimizer.flatten": BOOL,
  # Training.
  "train.num_steps": POSITIVE_INT,
  "train.label_smoothing": FRACTION,
  "train.init_prng_impl": _choice(*INIT_PRNG_IMPLS),
  "train.loss_weights.*": Rule(lambda v: _finite(v) and v >= 0, "a number >= 0 (1 is the default)"),
  "train.log_every": POSITIVE_INT,
  "train.eval_every": POSITIVE_INT,
  "train.eval_batches": COUNT,
  "train.checkpoint_every": POSITIVE_INT,
  "train.keep_checkpoints": POSITIVE_INT,
  "train.max_consecutive_nonfinite": POSITIVE_INT,
  "train.microbatches": POSITIVE_INT,
  "train.fixed_batch": BOOL,
  "train.expert_load": BOOL,
  "train.inject_nonfinite_steps": Rule(
    lambda v: isinstance(v, tuple | list) and all(_is_int(s) and s >= 0 for s in v),
    "a tuple of step numbers >= 0",
  ),
  # Decoding.
  "decode.beam_size": POSITIVE_INT,
  "decode.length_penalty": Rule(lambda v: _finite(v) and v >= 0, "a number >= 0 (0.6 is usual)"),
  "decode.max_decode_length": POSITIVE_INT,
}


def rule_key(path: str) -> str | None:
  """The FIELD_RULES key of a field ("model.d", "data.weights.*"), or None."""
  if path in FIELD_RULES:
    return path
  pattern = f"{path.rpartition('.')[0]}.*"
  return pattern if pattern in FIELD_RULES else None


def leaf_fields(config, prefix: str = ""):
  """(path, value) of every field that is not itself a group of fields."""
  import ml_collections

  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from leaf_fields(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _check_fields(config):
  """Each field against its rule, in the table's order: a field tied to another
  (data.tokenizer_vocab_size to model.vocab_size) is then named by the one a user sets. A field
  without a rule (a config file's own addition) is left to the code that reads it."""
  order = {key: i for i, key in enumerate(FIELD_RULES)}
  keyed = [(rule_key(path), path, value) for path, value in leaf_fields(config)]
  for key, path, value in sorted(
    ((k, p, v) for k, p, v in keyed if k is not None), key=lambda item: order[item[0]]
  ):
    if not FIELD_RULES[key].ok(value):
      raise ConfigError(f"config.{path}={value!r}: use {FIELD_RULES[key].use}")


def validate(config, num_devices: int, check_data: bool = True) -> dict[str, int]:
  """Checks the whole config; returns the resolved mesh shape.

  `check_data=False` skips looking for the datasets on disk (ahead-of-time compilation reads none).
  """
  _check_fields(config)
  mesh = sharding.mesh_shape(config.mesh, num_devices)
  rules = sharding.config_rules(config)
  _validate_data(config, mesh)  # first: the model's audio check reads the task list
  _validate_model(config, mesh, sharding.mesh_axes_of(rules, "expert"))
  _validate_optimizer(config.optimizer, mesh, rules)
  if check_data:
    _check_paper_sources(config)
    check_data_files(config)
  return mesh


def _validate_model(config, mesh, expert_axes):
  m = config.model
  _require(
    m.d % m.num_heads == 0,
    f"config.model.d={m.d} is not divisible by config.model.num_heads={m.num_heads}: "
    "pick num_heads dividing d",
  )
  _require(
    m.vocab_size % mesh["model"] == 0,
    f"config.model.vocab_size={m.vocab_size} is not divisible by config.mesh.model="
    f"{mesh['model']}: pick a vocabulary size that is",
  )
  _validate_audio_frames(m, config)
  if m.ffn == "moe":
    from mm_jax.models import moe

    moe.validate_moe_config(m.moe, mesh, expert_axes)


def _validate_audio_frames(m, config):
  """The audio net strides time by audio_stem_stride and then 2 per block: fewer frames than that
  leave it nothing to encode, and the CTC loss cannot align a transcript longer than what is left
  (the input pipeline would drop every clip as too long, or the loss be infinite)."""
  from mm_jax.data import layout

  data = config.data
  stride = m.audio_stem_stride * 2**m.audio_blocks
  frames = data.max_audio_frames
  _require(
    frames >= stride,
    f"config.data.max_audio_frames={frames} is below the audio net's time stride {stride} "
    f"(config.model.audio_stem_stride x 2^config.model.audio_blocks): use at least {stride}",
  )
  if "speech_recognition" in layout.task_names(config) and m.audio_ctc_weight > 0:
    positions = -(-frames // stride)
    transcript = layout.text_length(config, "speech_recognition", "targets")
    _require(
      positions >= transcript,
      f"config.data.max_audio_frames={frames} leaves {positions} encoded positions for "
      f"transcripts of up to {transcript} tokens, too few for the CTC loss "
      f"(config.model.audio_ctc_weight): use at least {transcript * stride}",
    )


# Logical axes that name activations only: no parameter of mm_jax/models has them
# (tests/test_model.py checks), so splitting them leaves every parameter whole.
ACTIVATION_ONLY_AXES = ("batch", "group", "length", "capacity")


def _validate_optimizer(o, mesh, rules):
  if o.decay == "wsd":
    _require(
      o.cooldown_fraction > 0,
      f"config.optimizer.cooldown_fraction={o.cooldown_fraction!r}: use a value in (0, 1] (the "
      "share of the run over which wsd decays to zero)",
    )
  if o.flatten:
    # One replicated vector holds every parameter: none may be split.
    for name, _ in rules:
      for axis in () if name in ACTIVATION_ONLY_AXES else sharding.mesh_axes_of(rules, name):
        _require(
          mesh[axis] == 1,
          f"config.optimizer.flatten=True keeps the optimizer state in one replicated vector, "
          f"but parameter axis {name!r} is split over mesh axis {axis!r} ({mesh[axis]} devices): "
          "set --config.optimizer.flatten=False",
        )


def _validate_data(config, mesh):
  from mm_jax import mixture
  from mm_jax.data import tasks

  d = config.data
  names = [t for t in str(d.tasks).split(",") if t]
  _require(bool(names), "config.data.tasks is empty: name at least one task")
  known = tuple(tasks.TASKS)
  for name in names:
    _require(
      name in known, f"config.data.tasks has unknown task {name!r}: use some of {', '.join(known)}"
    )
  _require(len(set(names)) == len(names), "config.data.tasks lists a task twice: remove it")
  for field in ("input_lengths", "target_lengths"):
    for name in d[field] or {}:
      _require(
        name in known, f"config.data.{field} names unknown task {name!r}: use some of {known}"
      )
  for name in config.train.loss_weights or {}:
    _require(
      name in known, f"config.train.loss_weights names unknown task {name!r}: use some of {known}"
    )
  data_parallel = mesh["data"] * mesh["expert"]
  sizes = mixture.task_batch_sizes(config, data_parallel)  # raises ConfigError on a bad split
  microbatches = config.train.microbatches
  for name, size in sizes.items():
    per_shard = size // data_parallel
    examples = "example" if per_shard == 1 else "examples"
    _require(
      per_shard % microbatches == 0,
      f"config.train.microbatches={microbatches} does not divide {name}'s {per_shard} {examples} "
      f"per data-parallel shard ({size} a step over {data_parallel}): use a divisor of "
      f"{per_shard} or raise config.data.global_batch_size",
    )


def _check_paper_sources(config):
  """The paper mixture reads prepared TFDS datasets: say which one is missing before compiling."""
  if config.data.mixture != "paper":
    return
  import tensorflow_datasets as tfds

  from mm_jax.data import layout, pipeline, ptb  # noqa: F401  (ptb registers mm_penn_treebank)

  root = pipeline.tfds_data_dir(config)
  if "://" not in root and not os.path.isdir(root):
    raise ConfigError(
      f"config.data.data_dir={config.data.data_dir!r}: directory {root} does not exist; the paper "
      "mixture needs its TFDS datasets prepared there"
    )
  for task in layout.build_tasks(config).values():
    source = task.source
    if tfds.builder(source.tfds_name, data_dir=root).is_prepared():
      continue
    field = source.manual_dir_field
    if field:
      manual = config.data[field]
      _require(
        bool(manual) and os.path.isdir(os.path.expanduser(manual)),
        f"config.data.{field}={manual!r}: task {task.name} needs {source.tfds_name} prepared in "
        f"{root} or its source files in an existing config.data.{field}",
      )
      continue
    raise ConfigError(
      f"config.data.data_dir={config.data.data_dir!r}: task {task.name} needs TFDS dataset "
      f"{source.tfds_name} prepared in {root}: run `tfds build {source.tfds_name.split('/')[0]} "
      f"--data_dir={root}` where the data is reachable"
    )


# TFRecord framing: each record is an 8-byte length, its 4-byte CRC, the data and the data's CRC.
_RECORD_OVERHEAD = 16


def check_data_files(config):
  """What only opening files shows, before a workdir is written: a data_dir that is not a
  directory, prepared datasets whose TFRecord files are cut short or are not TFRecords, a saved
  tokenizer that is not one. Cheap: file sizes against each dataset_info.json and each file's
  first record header; no record is decoded and TensorFlow is not imported. What is not there
  yet (an embedded build, a tokenizer) is made later, as before."""
  from mm_jax.data import layout
  from mm_jax.data import tokenizer as tokenizer_lib

  root = layout.data_root(config)
  if "://" in root:
    return
  existing = root
  while not os.path.exists(existing) and os.path.dirname(existing) != existing:
    existing = os.path.dirname(existing)
  _require(
    os.path.isdir(existing),
    f"config.data.data_dir={config.data.data_dir!r}: {existing} is not a directory: name a "
    "directory for the datasets and the tokenizer",
  )
  datasets = layout.tfds_data_dir(config)
  for task in layout.build_tasks(config).values():
    for info in sorted(epath.Path(datasets, task.source.tfds_name).glob("*/dataset_info.json")):
      _check_tfrecords(info)
  text_tasks = layout.text_task_names(config)
  if text_tasks:
    vocab_size = int(config.data.tokenizer_vocab_size)
    path = tokenizer_lib.model_path(root, layout.mixture_key(config), vocab_size, text_tasks)
    if os.path.exists(path):
      tokenizer_lib.load(path)  # ConfigError naming the file and the fix


def _check_tfrecords(info_path):
  """One prepared dataset's TFRecord files against its dataset_info.json."""
  import json

  directory = info_path.parent
  fix = f"delete {directory} and prepare it again (the embedded mixture rebuilds itself)"
  try:
    info = json.loads(info_path.read_text())
  except (OSError, ValueError):
    raise ConfigError(f"{info_path}: not readable JSON: {fix}") from None
  if info.get("fileFormat", "tfrecord") != "tfrecord":
    return
  for split in info.get("splits", []):
    records = sum(int(n) for n in split.get("shardLengths", []))
    files = sorted(directory.glob(f"*-{split['name']}.tfrecord-*"))
    _require(bool(files) or not records, f"{directory}: no {split['name']} files: {fix}")
    for file in files:
      with open(file, "rb") as f:
        header = f.read(12)
      size = os.path.getsize(file)
      length = int.from_bytes(header[:8], "little") if len(header) == 12 else size
      _require(
        length + _RECORD_OVERHEAD <= size,
        f"{file}: not a TFRecord file (its first record does not fit in it): {fix}",
      )
    expected = int(split.get("numBytes", 0)) + _RECORD_OVERHEAD * records
    actual = sum(os.path.getsize(file) for file in files)
    _require(
      not split.get("numBytes") or actual == expected,
      f"{directory}: its {split['name']} files hold {actual} bytes where dataset_info.json "
      f"expects {expected}: truncated or damaged: {fix}",
    )


def check_workdir(workdir: str, flag: str = "--workdir"):
  """Fails early, with one line, if the workdir (a local path or gs://...) is empty (it would
  mean the current directory) or cannot be written. `flag` names the directory's flag."""
  if not workdir.strip():
    raise ConfigError(f"{flag} is empty: name the run's directory")
  try:
    root = epath.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f".write_test_{os.getpid()}_{uuid.uuid4().hex}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as error:
    reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
    raise ConfigError(
      f"{flag}={workdir}: not writable ({reason}): choose a writable directory"
    ) from None
