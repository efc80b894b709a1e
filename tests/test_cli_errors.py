"""Every command's bad input is one line on stderr and a non-zero exit, with nothing written:
the commands other than training (training's own cases are in test_config_errors.py)."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=configs/multimodel.py:tiny"
# "predict: error: ...", "flag error: ...", "config error: ...": how the commands report.
ERROR_LINE = re.compile(r"^(?:[\w.]+: )?(?:flag |config )?error: ")

# (module, arguments, the text the one line must contain); WORKDIR is an empty directory.
CASES = {
  "predict_missing_config": (
    "mm_jax.predict",
    ["--workdir=WORKDIR", "--task=translate_en_de", "--config=configs/nope.py", "hello"],
    "configs/nope.py: no such file",
  ),
  "predict_no_checkpoint": (
    "mm_jax.predict",
    ["--workdir=WORKDIR", "--task=translate_en_de", TINY, "hello"],
    "no checkpoint",
  ),
  "predict_nothing_to_predict": (
    "mm_jax.predict",
    ["--workdir=WORKDIR", "--task=translate_en_de", TINY],
    "nothing to predict",
  ),
  "predict_unknown_flag": ("mm_jax.predict", ["--workdir=WORKDIR", "--tsk=x"], "tsk"),
  "evaluate_missing_config": (
    "mm_jax.evaluate",
    ["--workdir=WORKDIR", "--config=configs/nope.py"],
    "configs/nope.py: no such file",
  ),
  "evaluate_zero_batches": ("mm_jax.evaluate", ["--workdir=WORKDIR", "--eval_batches=0"], "1"),
  "inspect_missing_config": ("mm_jax.data.inspect", ["--config=configs/nope.py"], "no such file"),
  "inspect_zero_batch": (
    "mm_jax.data.inspect",
    [TINY, "--config.data.global_batch_size=0"],
    "config.data.global_batch_size=0",
  ),
  "inspect_misspelt_field": ("mm_jax.data.inspect", [TINY, "--config.data.taks=x"], "taks"),
  "inspect_negative_examples": ("mm_jax.data.inspect", [TINY, "--examples=-1"], "--examples"),
  "gallery_negative_examples": (
    "mm_jax.gallery",
    ["--workdir=WORKDIR", "--examples=-1"],
    "--examples=-1",
  ),
  "gallery_unwritable_output": (
    "mm_jax.gallery",
    ["--workdir=WORKDIR", "--output_dir=/proc/x"],
    "--output_dir=/proc/x",
  ),
  "aot_missing_config": ("mm_jax.aot", ["--config=configs/nope.py"], "no such file"),
  "aot_unknown_topology": ("mm_jax.aot", [TINY, "--topology=v9-8"], "--topology='v9-8'"),
  "aot_bad_config": ("mm_jax.aot", [TINY, "--config.model.d=0"], "config.model.d"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_and_writes_nothing(name, tmp_path):
  module, args, text = CASES[name]
  workdir = tmp_path / "work"
  workdir.mkdir()
  args = [a.replace("WORKDIR", str(workdir)) for a in args]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode != 0, result.stderr
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if ERROR_LINE.match(line)]
  assert len(errors) == 1, result.stderr[-3000:]
  assert text in errors[0], errors[0]
  assert list(workdir.iterdir()) == []
