"""bench/paper.py: the runs it plans, its verdict rules, and the command end to end (tiny)."""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import short_kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from bench import paper  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "multimodel.py")


def _flag(flags, name):
  values = [f.split("=", 1)[1] for f in flags if f.startswith(f"--{name}=")]
  return values[-1] if values else None


def test_single_task_runs_get_the_batch_their_task_gets_in_the_joint_run():
  runs = paper.plan_runs(CONFIG, steps=200)
  # By hand from configs/multimodel.py's default weights (2, 0.5, 2, 2, 0.25 x 4 of 120).
  expected = {
    "image_classification": 32,
    "image_captioning": 8,
    "speech_recognition": 32,
    "constituency_parsing": 32,
    "translate_en_de": 4,
    "translate_de_en": 4,
    "translate_en_fr": 4,
    "translate_fr_en": 4,
  }
  assert set(runs) == {
    "joint",
    *(f"single:{t}" for t in expected),
    "parsing+image",
    "no_moe",
    "no_attention",
  }
  for task, batch in expected.items():
    flags = runs[f"single:{task}"]
    assert _flag(flags, "config") == f"{CONFIG}:default,tasks={task}"
    assert _flag(flags, "config.data.global_batch_size") == str(batch)
  assert _flag(runs["parsing+image"], "config.data.global_batch_size") == "64"
  assert _flag(runs["no_moe"], "config").endswith(":default,no_moe,tasks=" + "+".join(expected))
  assert _flag(runs["no_attention"], "config").split(":")[1].startswith("default,no_attention")
  for flags in runs.values():
    assert _flag(flags, "config.train.num_steps") == "200"
    assert _flag(flags, "config.optimizer.warmup_steps") == "100"  # 150, at most half of 200


def test_verdict_rules():
  results = {
    "joint": {"a": {"log_perplexity": 1.04}, "b": {"log_perplexity": 2.0}},
    "single": {"a": {"log_perplexity": 1.0}, "b": {"log_perplexity": 1.8}},
    "no_moe": {"a": {"log_perplexity": 1.03}, "b": {"log_perplexity": float("nan")}},
  }
  assert paper.compare("joint", "single", "a", results, paper.ABOUT_AS_WELL) is True
  assert paper.compare("joint", "single", "b", results, paper.ABOUT_AS_WELL) is False
  assert paper.compare("joint", "single", "a", results, 0.0) is False
  assert paper.compare("joint", "no_moe", "a", results, paper.NO_WORSE) is True
  assert paper.compare("joint", "no_moe", "b", results, paper.NO_WORSE) is None
  assert paper.compare("joint", "missing", "a", results, 0.0) is None


def _eval_scalars(workdir, step):
  """The run's held-out metrics at `step`, read straight from its event files."""
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util

  found = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
    acc.Reload()
    for tag in acc.Tags()["tensors"]:
      for event in acc.Tensors(tag):
        if tag.startswith("eval/") and event.step == step:
          found[tag] = float(np.asarray(tensor_util.make_ndarray(event.tensor_proto)))
  return found


@pytest.mark.slow
def test_the_command_runs_every_run_through_main_and_tabulates_its_event_files(
  tiny_data_dir, tmp_path
):
  # One task: the single-task run is then the joint run's program (compiled once, read from the
  # session's compilation cache the second time) on the same batch size, so the two columns
  # agree here; what is checked is that each comes from its own run's event files.
  out = tmp_path / "paper"
  command = [
    sys.executable,
    os.path.join(REPO, "bench", "paper.py"),
    f"--config={CONFIG}:tiny,tasks=image_classification",
    "--steps=2",
    "--eval_batches=1",
    "--runs=joint,single:image_classification",
    f"--out={out}",
    "--",
    f"--config.data.data_dir={tiny_data_dir}",
    *short_kernels.flags(),
  ]
  # The bench's recorded table goes to the test's folder, never into the checkout's bench/results.
  env = dict(os.environ, JAX_PLATFORMS="cpu", MM_JAX_BENCH_RESULTS_DIR=str(out / "results"))
  first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  assert (out / "results" / "paper.md").exists()
  joint = _eval_scalars(out / "runs" / "joint", 2)
  single = _eval_scalars(out / "runs" / "single_image_classification", 2)
  assert (
    "eval/image_classification/accuracy" in joint and "eval/image_classification/accuracy" in single
  )
  report = (out / "paper.md").read_text()
  assert report in first.stdout
  row = next(line for line in report.splitlines() if line.startswith("| image_classification |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  # Table 2's columns: task, metric, then (log-ppl, acc, metric) for single and for joint.
  assert cells[1] == "accuracy"
  expected = [
    single["eval/image_classification/log_perplexity"],
    single["eval/image_classification/token_accuracy"],
    single["eval/image_classification/accuracy"],
    joint["eval/image_classification/log_perplexity"],
    joint["eval/image_classification/token_accuracy"],
    joint["eval/image_classification/accuracy"],
  ]
  assert cells[2:8] == [f"{v:.2f}" for v in expected]
  # One label per example: teacher-forced accuracy is the classification accuracy, over the
  # real examples only (the held-out batch is padded).
  for run in (single, joint):
    assert run["eval/image_classification/token_accuracy"] == pytest.approx(
      run["eval/image_classification/accuracy"], abs=1e-4
    )
  assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # A second call finds both final evaluations and runs nothing.
  log = out / "runs" / "joint" / "log.txt"
  before = log.stat().st_mtime_ns
  again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("not run again") == 2
  assert log.stat().st_mtime_ns == before
