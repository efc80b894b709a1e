"""Mixing strategies against hand-computed shares, and a resume that changes the mixture."""

import shutil

import jax
import numpy as np
import pytest
import trained_tiny

from configs.multimodel import get_config
from mm_jax import checkpointing, mixture, train, validation
from mm_jax.data import layout, pipeline
from mm_jax.errors import ConfigError

TASKS = ("image_classification", "translate_en_de", "constituency_parsing")
COUNTS = dict(zip(TASKS, (100, 400, 1600)))


def _config(strategy, global_batch_size, **mixing):
  config = get_config("tiny,tasks=" + "+".join(TASKS))
  config.data.mixing.strategy = strategy
  config.data.mixing.update(mixing)
  config.data.global_batch_size = global_batch_size
  return config


# (strategy, global batch, mixing fields, weights) -> the shares worked out by hand.
CASES = {
  "weights": (("weights", 80, {}, (1.0, 2.0, 5.0)), (1 / 8, 2 / 8, 5 / 8)),
  "examples": (("examples", 105, {}, None), (100 / 2100, 400 / 2100, 1600 / 2100)),
  "examples, capped": (("examples", 70, {"max_examples": 900}, None), (1 / 14, 4 / 14, 9 / 14)),
  # sqrt(100), sqrt(400), sqrt(1600) = 10, 20, 40
  "temperature 2": (("temperature", 70, {"temperature": 2.0}, None), (1 / 7, 2 / 7, 4 / 7)),
  # the cap first: sqrt(900) = 30
  "temperature 2, capped": (
    ("temperature", 60, {"temperature": 2.0, "max_examples": 900}, None),
    (1 / 6, 2 / 6, 3 / 6),
  ),
  # cube roots of 1, 8, 64 (times 100^(1/3)): 1, 2, 4
  "temperature 3": (("temperature", 70, {"temperature": 3.0}, None), (1 / 7, 2 / 7, 4 / 7)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_shares_and_batch_sizes_match_hand_computation(case):
  (strategy, global_batch, mixing, weights), expected = CASES[case]
  config = _config(strategy, global_batch, **mixing)
  counts = COUNTS
  if case == "temperature 3":
    counts = {task: 100 * n**3 for task, n in zip(TASKS, (1, 2, 4))}
  if weights:
    config.data.weights.update(dict(zip(TASKS, weights)))
  tasks = layout.build_tasks(config)
  shares = mixture.shares(config, tasks, counts)
  np.testing.assert_allclose([shares[t] for t in TASKS], expected, rtol=1e-12)
  sizes = mixture.task_batch_sizes(config, 1, counts)
  assert [sizes[t] for t in TASKS] == [round(global_batch * s) for s in expected]


def test_table_shows_examples_share_and_examples_per_step():
  tasks = {t: None for t in TASKS}
  text = mixture.table(tasks, COUNTS, dict(zip(TASKS, (10, 20, 40))))
  assert text.splitlines()[2:] == [
    "| image_classification | 100 | 14.3% | 10 |",
    "| translate_en_de | 400 | 28.6% | 20 |",
    "| constituency_parsing | 1,600 | 57.1% | 40 |",
  ]


def test_a_share_below_one_example_names_the_strategy():
  config = _config("examples", 8)
  with pytest.raises(ConfigError, match=r"strategy='examples' \(image_classification's"):
    mixture.task_batch_sizes(config, 1, COUNTS)


@pytest.mark.parametrize(
  "field,value",
  [("strategy", "uniform"), ("temperature", 0.0), ("temperature", -2.0), ("max_examples", -1)],
)
def test_bad_mixing_settings_are_one_line_config_errors(field, value):
  config = get_config("tiny")
  config.data.mixing[field] = value
  with pytest.raises(ConfigError, match=rf"^config\.data\.mixing\.{field}=") as info:
    validation.validate(config, num_devices=1, check_data=False)
  assert "\n" not in str(info.value)


def _stream(batches, task, key):
  return np.concatenate([b[task][key] for b in batches])


@pytest.mark.slow
def test_resumed_iterator_under_a_new_mixture_continues_each_task(tiny_data_dir):
  """Three steps at 6 + 6, then the state resumed by examples (40 and 32 training examples:
  7 + 5 of 12): each task's batches continue its own example stream where it stopped."""
  tasks = "image_classification+translate_en_de"
  before = get_config(f"tiny,tasks={tasks}")
  before.data.data_dir = str(tiny_data_dir)
  before.data.global_batch_size = 12
  after = before.copy_and_resolve_references()
  after.data.mixing.strategy = "examples"
  first = pipeline.TrainIterator(before, data_parallel=1)
  read = [next(first) for _ in range(3)]
  state = first.get_state()
  assert state["examples"] == {"image_classification": 18, "translate_en_de": 18}

  resumed = pipeline.TrainIterator(after, data_parallel=1, tokenizer=first.tokenizer)
  resumed.set_state(state)
  assert resumed.batch_sizes == {"image_classification": 7, "translate_en_de": 5}
  continued = [next(resumed) for _ in range(4)]
  # The reference: the new mixture's readers from the start, 7 and 5 examples at a time.
  fresh = pipeline.TrainIterator(after, data_parallel=1, tokenizer=first.tokenizer)
  reference = [next(fresh) for _ in range(8)]
  for task, size in resumed.batch_sizes.items():
    for key in ("inputs", "targets"):
      stream = _stream(reference, task, key)
      np.testing.assert_array_equal(_stream(read, task, key), stream[:18])
      np.testing.assert_array_equal(_stream(continued, task, key), stream[18 : 18 + 4 * size])
  assert resumed.get_state()["examples"] == {"image_classification": 46, "translate_en_de": 38}

  # A position counted in batches (the earlier state format) continues only its own mixture.
  in_batches = {k: v for k, v in state.items() if k != "examples"}
  in_batches["fingerprint"] = first.layout._batches_fingerprint()
  assert first.layout.examples_consumed(in_batches) == state["examples"]
  with pytest.raises(ConfigError, match="the mixture: a position counted in batches"):
    resumed.layout.check(in_batches)
  other = after.copy_and_resolve_references()
  other.data.seed = 1  # the example streams themselves differ: refused
  with pytest.raises(ConfigError, match=r"config\.data\.seed: 0 then, 1 now"):
    pipeline.TrainIterator(other, data_parallel=1).set_state(state)


@pytest.mark.slow
def test_run_resumed_with_changed_weights_trains_on_the_new_shares(
  tmp_path_factory, tiny_data_dir, tmp_path
):
  """The tiny run (2 steps, 21 examples of each task a step) resumed for one step with
  image_classification weighted 2: 32 + 16 + 16 a step, each task from where it stopped; the
  step's metrics hold every task's expert load (the decoder's without the class task)."""
  workdir = tmp_path / "run"
  shutil.copytree(trained_tiny.trained_workdir(tmp_path_factory, tiny_data_dir), workdir)
  config = trained_tiny.tiny_config(tiny_data_dir)
  config.train.num_steps = 3
  config.data.weights.image_classification = 2.0
  result = train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"), keep=3)
  position = ckpt.newest_data_state()
  ckpt.close()
  assert position["examples"] == {
    "image_classification": 2 * 21 + 32,
    "speech_recognition": 2 * 21 + 16,
    "translate_en_de": 2 * 21 + 16,
  }
  ((step, summary),) = result["train"]
  assert step == 3
  experts = get_config("tiny").model.moe.num_experts
  for layer, tasks in (
    ("encoder", ("image_classification", "speech_recognition", "translate_en_de")),
    ("decoder", ("speech_recognition", "translate_en_de")),
  ):
    for task in tasks:
      shares = [summary[f"moe/{layer}/{task}/expert_{e}"] for e in range(experts)]
      assert sum(shares) == pytest.approx(1.0, abs=1e-5), (layer, task)
      assert 0.0 <= summary[f"moe/{layer}/{task}/dropped"] <= 1.0
      assert summary[f"moe/{layer}/{task}/balance_loss"] >= 0.0
  assert not any(k.startswith("moe/decoder/image_classification") for k in summary)
