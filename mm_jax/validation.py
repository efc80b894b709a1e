"""Config checks that run before anything is built or compiled.

Each failure is a `ConfigError` whose message is one line: the field, the bad value, the fix.
"""

import math
import os
import uuid

from etils import epath

from mm_jax import sharding
from mm_jax.errors import ConfigError

_DTYPES = ("float32", "bfloat16")
# config.model.dtype (activations) and config.model.kernels: "auto" is decided by run.build from
# the run's devices (run.model_config).
ACTIVATION_DTYPES = ("auto", *_DTYPES)
KERNELS = ("auto", "cpu", "xla")
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


def _positive_int(value, field: str):
  _require(
    isinstance(value, int) and not isinstance(value, bool) and value > 0,
    f"{field}={value!r}: use a positive integer",
  )


def validate(config, num_devices: int, check_data: bool = True) -> dict[str, int]:
  """Checks the whole config; returns the resolved mesh shape.

  `check_data=False` skips looking for the datasets on disk (ahead-of-time compilation reads none).
  """
  mesh = sharding.mesh_shape(config.mesh, num_devices)
  rules = sharding.config_rules(config)
  _validate_model(config.model, mesh, sharding.mesh_axes_of(rules, "expert"))
  _validate_optimizer(config.optimizer, mesh, rules)
  _validate_train(config.train)
  _validate_data(config, mesh)
  _validate_decode(config.decode)  # after the data: max_decode_length follows max_text_length
  if check_data:
    _check_paper_sources(config)
  return mesh


def _validate_model(m, mesh, expert_axes):
  _positive_int(m.d, "config.model.d")
  _positive_int(m.num_heads, "config.model.num_heads")
  _require(
    m.d % m.num_heads == 0,
    f"config.model.d={m.d} is not divisible by config.model.num_heads={m.num_heads}: "
    "pick num_heads dividing d",
  )
  _require(
    isinstance(m.dropout, int | float) and 0.0 <= m.dropout < 1.0,
    f"config.model.dropout={m.dropout!r}: use a value in [0, 1)",
  )
  for name in ("conv_group1", "conv_group2"):
    steps = m[name]
    ok = len(steps) > 0 and all(
      len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s) for s in steps
    )
    _require(ok, f"config.model.{name}={steps!r}: use ((kernel, dilation), ...) positive ints")
  for name in (
    "encoder_blocks_before_ffn",
    "encoder_blocks_after_ffn",
    "decoder_blocks_before_ffn",
    "decoder_blocks_after_ffn",
  ):
    value = m[name]
    _require(
      isinstance(value, int) and value >= 0, f"config.model.{name}={value!r}: use an integer >= 0"
    )
  _require(m.ffn in ("moe", "dense"), f"config.model.ffn={m.ffn!r}: use 'moe' or 'dense'")
  from mm_jax.models.multimodel import REMAT_MODES

  _require(
    m.remat in REMAT_MODES,
    f"config.model.remat={m.remat!r}: use one of {', '.join(map(repr, REMAT_MODES))}",
  )
  ctc = m.audio_ctc_weight
  _require(
    isinstance(ctc, int | float) and ctc >= 0,
    f"config.model.audio_ctc_weight={ctc!r}: use a number >= 0 (0 turns the CTC loss off)",
  )
  _positive_int(m.audio_stem_stride, "config.model.audio_stem_stride")
  _positive_int(m.vocab_size, "config.model.vocab_size")
  _require(m.vocab_size >= 8, f"config.model.vocab_size={m.vocab_size}: use at least 8")
  _positive_int(m.audio_blocks, "config.model.audio_blocks")
  _positive_int(m.audio_num_mel_bins, "config.model.audio_num_mel_bins")
  _require(
    m.dtype in ACTIVATION_DTYPES,
    f"config.model.dtype={m.dtype!r}: use one of {ACTIVATION_DTYPES}",
  )
  _require(
    m.kernels in KERNELS,
    f"config.model.kernels={m.kernels!r}: use one of {KERNELS} ('auto': 'cpu' on CPUs, "
    "'xla' on TPUs and GPUs)",
  )
  _require(
    m.param_dtype in _DTYPES, f"config.model.param_dtype={m.param_dtype!r}: use one of {_DTYPES}"
  )
  _require(
    m.vocab_size % mesh["model"] == 0,
    f"config.model.vocab_size={m.vocab_size} is not divisible by config.mesh.model="
    f"{mesh['model']}: pick a vocabulary size that is",
  )
  if m.ffn == "moe":
    from mm_jax.models import moe

    moe.validate_moe_config(m.moe, mesh, expert_axes)


# Logical axes that name activations only: no parameter of mm_jax/models has them
# (tests/test_model.py checks), so splitting them leaves every parameter whole.
ACTIVATION_ONLY_AXES = ("batch", "group", "length", "capacity")


def _validate_optimizer(o, mesh, rules):
  _require(
    _is_number(o.learning_rate) and math.isfinite(o.learning_rate) and o.learning_rate > 0,
    f"config.optimizer.learning_rate={o.learning_rate!r}: use a finite positive number",
  )
  _require(
    isinstance(o.warmup_steps, int) and o.warmup_steps >= 0,
    f"config.optimizer.warmup_steps={o.warmup_steps!r}: use an integer >= 0",
  )
  decays = ("rsqrt", "cosine", "wsd", "constant")
  _require(o.decay in decays, f"config.optimizer.decay={o.decay!r}: use one of {decays}")
  if o.decay == "wsd":
    f = o.cooldown_fraction
    _require(
      _is_number(f) and 0 < f <= 1,
      f"config.optimizer.cooldown_fraction={f!r}: use a value in (0, 1] (the share of the run"
      " over which wsd decays to zero)",
    )
  for name in ("b1", "b2"):
    _require(0.0 <= o[name] < 1.0, f"config.optimizer.{name}={o[name]!r}: use a value in [0, 1)")
  _require(o.eps > 0, f"config.optimizer.eps={o.eps!r}: use a positive number")
  _require(
    o.grad_clip_norm > 0, f"config.optimizer.grad_clip_norm={o.grad_clip_norm!r}: use a value > 0"
  )
  _require(o.weight_decay >= 0, f"config.optimizer.weight_decay={o.weight_decay!r}: use >= 0")
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


def _validate_train(t):
  for name in ("num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    _positive_int(t[name], f"config.train.{name}")
  _positive_int(t.max_consecutive_nonfinite, "config.train.max_consecutive_nonfinite")
  _positive_int(t.microbatches, "config.train.microbatches")
  load = t.expert_load
  _require(isinstance(load, bool), f"config.train.expert_load={load!r}: use True or False")
  _require(
    isinstance(t.eval_batches, int) and t.eval_batches >= 0,
    f"config.train.eval_batches={t.eval_batches!r}: use an integer >= 0",
  )
  _require(
    0.0 <= t.label_smoothing < 1.0,
    f"config.train.label_smoothing={t.label_smoothing!r}: use a value in [0, 1)",
  )
  _require(
    t.init_prng_impl in INIT_PRNG_IMPLS,
    f"config.train.init_prng_impl={t.init_prng_impl!r}: use one of {INIT_PRNG_IMPLS}",
  )
  inject = t.inject_nonfinite_steps
  _require(
    isinstance(inject, tuple | list)
    and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in inject),
    f"config.train.inject_nonfinite_steps={inject!r}: use a tuple of step numbers >= 0",
  )


def _validate_decode(dec):
  _positive_int(dec.beam_size, "config.decode.beam_size")
  _positive_int(dec.max_decode_length, "config.decode.max_decode_length")
  _require(
    _is_number(dec.length_penalty)
    and math.isfinite(dec.length_penalty)
    and dec.length_penalty >= 0,
    f"config.decode.length_penalty={dec.length_penalty!r}: use a number >= 0 (0.6 is usual)",
  )


def _one_of(value, choices: tuple, field: str):
  _require(value in choices, f"{field}={value!r}: use one of {', '.join(map(repr, choices))}")


def _validate_data(config, mesh):
  from mm_jax.data import layout, tasks

  d = config.data
  mixtures = ("embedded", "paper")
  _require(d.mixture in mixtures, f"config.data.mixture={d.mixture!r}: use one of {mixtures}")
  _one_of(d.embedded_scale, layout.EMBEDDED_SCALES, "config.data.embedded_scale")
  _one_of(d.text_overlength, layout.TEXT_OVERLENGTH, "config.data.text_overlength")
  _one_of(d.parse_pos_tags, layout.PARSE_POS_TAGS, "config.data.parse_pos_tags")
  names = [t for t in str(d.tasks).split(",") if t]
  _require(bool(names), "config.data.tasks is empty: name at least one task")
  known = tuple(tasks.TASKS)
  for name in names:
    _require(
      name in known, f"config.data.tasks has unknown task {name!r}: use some of {', '.join(known)}"
    )
  _require(len(set(names)) == len(names), "config.data.tasks lists a task twice: remove it")
  _positive_int(d.global_batch_size, "config.data.global_batch_size")
  for name in ("max_text_length", "max_audio_frames", "image_size", "caption_image_size"):
    _positive_int(d[name], f"config.data.{name}")
  for field in ("input_lengths", "target_lengths"):
    for name, length in (d[field] or {}).items():
      _require(
        name in known, f"config.data.{field} names unknown task {name!r}: use some of {known}"
      )
      _positive_int(length, f"config.data.{field}.{name}")
  for name, weight in (config.train.loss_weights or {}).items():
    _require(
      name in known, f"config.train.loss_weights names unknown task {name!r}: use some of {known}"
    )
    _require(
      _is_number(weight) and weight >= 0,
      f"config.train.loss_weights.{name}={weight!r}: use a number >= 0 (1 is the default)",
    )
  _validate_mixing(d.mixing)
  data_parallel = mesh["data"] * mesh["expert"]
  sizes = layout.task_batch_sizes(config, data_parallel)  # raises ConfigError on a bad split
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


def _validate_mixing(mixing):
  from mm_jax import mixture

  _one_of(mixing.strategy, mixture.STRATEGIES, "config.data.mixing.strategy")
  t = mixing.temperature
  _require(
    _is_number(t) and math.isfinite(t) and t > 0,
    f"config.data.mixing.temperature={t!r}: use a number > 0 (1: by examples; 2 or 3 is usual)",
  )
  cap = mixing.max_examples
  _require(
    isinstance(cap, int) and not isinstance(cap, bool) and cap >= 0,
    f"config.data.mixing.max_examples={cap!r}: use an integer >= 0 (0: no cap)",
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
