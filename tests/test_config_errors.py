"""Bad configs: one line naming the field, and no checkpoint; every field has a rule.

The cases go through `train.train_and_evaluate` in-process (validation runs before anything is
built). The command lines, with their flag parsing and exit codes, are in test_bad_inputs.py.
"""

import os

import pytest

from configs import multimodel as multimodel_config  # noqa: E402
from mm_jax import train, validation  # noqa: E402
from mm_jax.errors import ConfigError  # noqa: E402

# (overrides on the tiny config, text the one-line message must contain)
CASES = {
  "d_zero": ({"model.d": 0}, "config.model.d"),
  "heads_not_dividing_d": ({"model.num_heads": 3}, "config.model.num_heads"),
  "dropout_above_one": ({"model.dropout": 1.5}, "config.model.dropout"),
  "negative_ctc_weight": ({"model.audio_ctc_weight": -1.0}, "config.model.audio_ctc_weight"),
  "zero_audio_stem_stride": ({"model.audio_stem_stride": 0}, "config.model.audio_stem_stride"),
  "unknown_ffn": ({"model.ffn": "sparse"}, "config.model.ffn"),
  "vocab_too_small": ({"model.vocab_size": 4}, "config.model.vocab_size"),
  "unknown_dtype": ({"model.dtype": "float16"}, "config.model.dtype"),
  "unknown_kernels": ({"model.kernels": "gpu"}, "config.model.kernels"),
  "empty_conv_group": ({"model.conv_group1": ()}, "config.model.conv_group1"),
  "negative_blocks": ({"model.encoder_blocks_before_ffn": -1}, "encoder_blocks_before_ffn"),
  "vocab_not_split_by_model_axis": (
    {"model.vocab_size": 255, "mesh.data": 4, "mesh.model": 2},
    "config.model.vocab_size",
  ),
  "no_experts": ({"model.moe.num_experts": 0}, "moe.num_experts"),
  "k_above_experts": ({"model.moe.k": 5}, "moe.k"),
  "unknown_balance_loss": ({"model.moe.balance_loss": "l2"}, "moe.balance_loss"),
  "unknown_dispatch": ({"model.moe.dispatch": "magic"}, "moe.dispatch"),
  "zero_capacity": ({"model.moe.capacity_factor_train": 0.0}, "moe.capacity_factor_train"),
  "experts_not_split_by_expert_axis": (
    {"model.moe.num_experts": 6, "mesh.data": 2, "mesh.expert": 4},
    "num_experts",
  ),
  "experts_not_split_by_every_device": (
    {
      "model.moe.num_experts": 4,
      "mesh.data": 2,
      "mesh.expert": 4,
      "mesh_rules.expert": "data,expert",
    },
    "num_experts",
  ),
  "unknown_mesh_axis_in_rule": ({"mesh_rules.expert": "experts"}, "config.mesh_rules.expert"),
  "batch_rule_changed": ({"mesh_rules.batch": "data"}, "config.mesh_rules.batch"),
  "mesh_product_wrong": ({"mesh.data": 3}, "config.mesh"),
  "mesh_two_fills": ({"mesh.expert": -1}, "config.mesh"),
  "mesh_fill_impossible": ({"mesh.expert": 3}, "config.mesh.data"),
  "mesh_zero_axis": ({"mesh.model": 0}, "config.mesh.model"),
  "flat_optimizer_on_split_parameters": (
    {"optimizer.flatten": True, "mesh.data": 2, "mesh.expert": 4},
    "config.optimizer.flatten",
  ),
  "learning_rate_zero": ({"optimizer.learning_rate": 0.0}, "config.optimizer.learning_rate"),
  "unknown_decay": ({"optimizer.decay": "linear"}, "config.optimizer.decay"),
  "wsd_no_cooldown": (
    {"optimizer.decay": "wsd", "optimizer.cooldown_fraction": 0.0},
    "config.optimizer.cooldown_fraction",
  ),
  "b1_one": ({"optimizer.b1": 1.0}, "config.optimizer.b1"),
  "negative_warmup": ({"optimizer.warmup_steps": -5}, "config.optimizer.warmup_steps"),
  "zero_steps": ({"train.num_steps": 0}, "config.train.num_steps"),
  "zero_log_every": ({"train.log_every": 0}, "config.train.log_every"),
  "smoothing_one": ({"train.label_smoothing": 1.0}, "config.train.label_smoothing"),
  "unknown_init_prng": ({"train.init_prng_impl": "mt19937"}, "config.train.init_prng_impl"),
  "negative_loss_weight": (
    {"train.loss_weights.translate_en_de": -1.0},
    "config.train.loss_weights.translate_en_de",
  ),
  "loss_weight_of_unknown_task": (
    {"train.loss_weights": {"nosuch": 2.0}},
    "config.train.loss_weights",
  ),
  "zero_nonfinite_limit": (
    {"train.max_consecutive_nonfinite": 0},
    "config.train.max_consecutive_nonfinite",
  ),
  "negative_injected_step": (
    {"train.inject_nonfinite_steps": (-1,)},
    "config.train.inject_nonfinite_steps",
  ),
  "unknown_task": ({"data.tasks": "image_classification,nosuch"}, "config.data.tasks"),
  "no_tasks": ({"data.tasks": ""}, "config.data.tasks"),
  "task_twice": ({"data.tasks": "translate_en_de,translate_en_de"}, "config.data.tasks"),
  "unknown_mixture": ({"data.mixture": "mine"}, "config.data.mixture"),
  "batch_not_split": ({"data.global_batch_size": 12}, "global_batch_size"),
  "zero_text_length": ({"data.max_text_length": 0}, "config.data.max_text_length"),
  "zero_target_length": (
    {"data.target_lengths": {"translate_en_de": 0}},
    "config.data.target_lengths.translate_en_de",
  ),
  "length_of_unknown_task": ({"data.input_lengths": {"nosuch": 8}}, "config.data.input_lengths"),
  "unknown_embedded_scale": ({"data.embedded_scale": "huge"}, "config.data.embedded_scale"),
  "unknown_text_overlength": ({"data.text_overlength": "bogus"}, "config.data.text_overlength"),
  "unknown_pos_tags": ({"data.parse_pos_tags": "some"}, "config.data.parse_pos_tags"),
  "negative_audio_blocks": ({"model.audio_blocks": -1}, "config.model.audio_blocks"),
  "audio_frames_below_stride": ({"data.max_audio_frames": 1}, "config.data.max_audio_frames=1"),
  "audio_frames_too_few_for_ctc": (
    {"data.max_audio_frames": 64},
    "16 encoded positions for transcripts of up to 32 tokens",
  ),
  "unknown_remat": ({"model.remat": "all"}, "config.model.remat='all'"),
  "zero_shuffle_buffer": ({"data.shuffle_buffer": 0}, "config.data.shuffle_buffer=0"),
  "target_spaces_reordered": (
    {"model.target_spaces": ("de", "en", "fr", "parse", "class")},
    "config.model.target_spaces",
  ),
  "empty_data_dir": ({"data.data_dir": " "}, "config.data.data_dir"),
  "grayscale_channels": ({"model.image_channels": 1}, "config.model.image_channels=1"),
  "negative_balance_coef": ({"model.moe.balance_coef": -0.1}, "config.model.moe.balance_coef"),
  "zero_beam": ({"decode.beam_size": 0}, "config.decode.beam_size"),
  "negative_length_penalty": ({"decode.length_penalty": -1.0}, "config.decode.length_penalty"),
  "infinite_learning_rate": ({"optimizer.learning_rate": float("inf")}, "learning_rate=inf"),
  "nan_learning_rate": ({"optimizer.learning_rate": float("nan")}, "learning_rate=nan"),
}


# Every size with every modifier that adds or changes fields.
VARIANTS = (
  "tiny",
  "default",
  "paper",
  "paper,replicated",
  "default,no_moe,no_attention,fsdp",
  "tiny,tasks=a+b",
)


def _all_fields():
  return {
    path
    for variant in VARIANTS
    for path, _ in validation.leaf_fields(multimodel_config.get_config(variant))
  }


def test_every_config_field_has_a_rule():
  """A field added to configs/multimodel.py without a row in validation.FIELD_RULES fails here."""
  missing = sorted(p for p in _all_fields() if validation.rule_key(p) is None)
  assert not missing, f"fields without a rule in mm_jax/validation.py FIELD_RULES: {missing}"


def test_every_rule_is_for_a_field():
  """No stale rows: each rule names a field some config variant has."""
  used = {validation.rule_key(p) for p in _all_fields()}
  assert sorted(set(validation.FIELD_RULES) - used) == []


def _expect_config_error(config, workdir, field):
  with pytest.raises(ConfigError) as info:
    train.train_and_evaluate(config, str(workdir))
  message = str(info.value)
  assert field in message, message
  assert "\n" not in message, message
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  return message


@pytest.mark.parametrize("name", sorted(CASES))
def test_invalid_config_is_one_line_naming_the_field(name, tmp_path):
  overrides, field = CASES[name]
  config = multimodel_config.get_config("tiny")
  config.update_from_flattened_dict(overrides)
  _expect_config_error(config, tmp_path / "work", field)


def test_flat_optimizer_on_split_activations_only():
  """The counterpart of `flat_optimizer_on_split_parameters`: sequences split over `model` while
  every parameter axis stays whole is a valid mesh for one replicated optimizer vector."""
  config = multimodel_config.get_config("tiny")
  overrides = {"optimizer.flatten": True, "mesh.data": 4, "mesh.model": 2}
  for name in ("mlp", "heads", "vocab", "expert_mlp"):
    overrides[f"mesh_rules.{name}"] = ""
  overrides["mesh_rules.length"] = "model"
  config.update_from_flattened_dict(overrides)
  validation.validate(config, num_devices=8, check_data=False)
  config.mesh_rules.vocab = "model"
  with pytest.raises(ConfigError, match="config.optimizer.flatten.*'vocab'"):
    validation.validate(config, num_devices=8, check_data=False)


def test_paper_mixture_without_its_data_dir(tmp_path):
  config = multimodel_config.get_config("paper")
  config.mesh.expert = 1
  config.data.data_dir = str(tmp_path / "missing")
  _expect_config_error(config, tmp_path / "work", "config.data.data_dir")


def test_paper_mixture_with_an_empty_data_dir_names_the_dataset(tmp_path):
  config = multimodel_config.get_config("paper")
  config.mesh.expert = 1
  config.data.data_dir = str(tmp_path)
  message = _expect_config_error(config, tmp_path / "work", "config.data.data_dir")
  assert "imagenet2012" in message  # the first task's dataset, with the build command


def test_paper_parsing_without_penn_treebank_names_ptb_dir(tmp_path):
  config = multimodel_config.get_config("paper")
  config.mesh.expert = 1
  config.data.tasks = "constituency_parsing"
  config.data.data_dir = str(tmp_path)
  _expect_config_error(config, tmp_path / "work", "config.data.ptb_dir")


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  config = multimodel_config.get_config("tiny")
  _expect_config_error(config, blocker / "work", "--workdir")
