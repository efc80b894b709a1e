"""Every command's bad input: a non-zero exit, exactly one line on stderr naming the problem, no
traceback, and nothing written to the workdir.

The cases run in this process: each calls the command's `main` with flag values of its own
(mm_jax/cli.py), as `python -m` would, which costs milliseconds where a process costs seconds of
imports. A few run as real processes, where the process itself is the point: a config file that
does not parse, a missing one with overrides, and the TPU probe's noise on a CPU machine.
"""

import contextlib
import importlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import trained_tiny
from absl import flags
from test_predict_inputs import png_declaring, wav_bytes, with_rate

from mm_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=configs/multimodel.py:tiny"
# The trained run's tasks: its tokenizer is the one in the data directory.
TINY3 = f"--config=configs/multimodel.py:tiny,{trained_tiny.TASKS}"
PREDICT = ["--workdir=TRAINED", "--task=translate_en_de"]
PREDICT_IMAGE = ["--workdir=TRAINED", "--task=image_classification"]
PREDICT_SPEECH = ["--workdir=TRAINED", "--task=speech_recognition"]

# name: (module, arguments, text the one line must contain). Words in capitals are replaced:
# WORK a fresh directory's path (not created), TRAINED the tiny trained run, DATA its data,
# TRUNCATED and BADTOKENIZER copies of DATA with a TFRecord file cut short or a garbage
# tokenizer, FILE a plain file, and the inputs made by `_inputs`.
CASES = {
  # mm_jax.main: the config, its fields and the data, before anything is written.
  "main_embedded_scale_huge": (
    "mm_jax.main",
    [TINY, "--config.data.embedded_scale=huge"],
    "config.data.embedded_scale='huge'",
  ),
  "main_text_overlength_bogus": (
    "mm_jax.main",
    [TINY, "--config.data.text_overlength=bogus"],
    "config.data.text_overlength='bogus'",
  ),
  "main_audio_blocks_negative": (
    "mm_jax.main",
    [TINY, "--config.model.audio_blocks=-1"],
    "config.model.audio_blocks=-1",
  ),
  "main_beam_size_zero": ("mm_jax.main", [TINY, "--config.decode.beam_size=0"], "beam_size=0"),
  "main_learning_rate_inf": (
    "mm_jax.main",
    [TINY, "--config.optimizer.learning_rate=inf"],
    "learning_rate=inf",
  ),
  "main_learning_rate_nan": (
    "mm_jax.main",
    [TINY, "--config.optimizer.learning_rate=nan"],
    "learning_rate=nan",
  ),
  "main_max_audio_frames_1": (
    "mm_jax.main",
    [TINY, "--config.data.max_audio_frames=1"],
    "config.data.max_audio_frames=1",
  ),
  "main_remat_unknown": ("mm_jax.main", [TINY, "--config.model.remat=all"], "config.model.remat"),
  "main_zero_batch": (
    "mm_jax.main",
    [TINY, "--config.data.global_batch_size=0"],
    "config.data.global_batch_size=0",
  ),
  "main_impossible_mesh": ("mm_jax.main", [TINY, "--config.mesh.data=3"], "config.mesh"),
  "main_unknown_task": (
    "mm_jax.main",
    [TINY, "--config.data.tasks=image_classification,nosuch"],
    "config.data.tasks",
  ),
  "main_data_dir_is_a_file": (
    "mm_jax.main",
    [TINY, "--config.data.data_dir=FILE"],
    "is not a directory",
  ),
  "main_data_dir_below_a_file": (
    "mm_jax.main",
    [TINY, "--config.data.data_dir=FILE/data"],
    "is not a directory",
  ),
  "main_truncated_tfrecords": (
    "mm_jax.main",
    [TINY3, "--config.data.data_dir=TRUNCATED"],
    "truncated or damaged",
  ),
  "main_garbage_tokenizer": (
    "mm_jax.main",
    [TINY3, "--config.data.data_dir=BADTOKENIZER"],
    "not a sentencepiece model",
  ),
  "main_misspelt_field": (
    "mm_jax.main",
    [TINY, "--config.train.num_stepz=5"],
    "the config has no field 'num_stepz'; did you mean \"num_steps\"",
  ),
  "main_process_id_without_coordinator": (
    "mm_jax.main",
    [TINY, "--process_id=1", "--num_processes=2"],
    "--coordinator_address",
  ),
  "main_process_id_above_count": (
    "mm_jax.main",
    [TINY, "--process_id=5", "--num_processes=2", "--coordinator_address=localhost:1"],
    "--process_id=5 with --num_processes=2",
  ),
  "main_zero_processes": (
    "mm_jax.main",
    [TINY, "--num_processes=0", "--coordinator_address=localhost:1"],
    "--num_processes=0",
  ),
  "main_wrong_type": ("mm_jax.main", [TINY, "--config.train.num_steps=abc"], "num_steps"),
  "main_float_for_int": (
    "mm_jax.main",
    [TINY, "--config.data.global_batch_size=2.5"],
    "--config.data.global_batch_size",
  ),
  "main_bool_garbage": ("mm_jax.main", [TINY, "--config.train.fixed_batch=maybe"], "fixed_batch"),
  "main_unknown_flag": ("mm_jax.main", [TINY, "--bogus=1"], "bogus"),
  "main_unknown_variant": ("mm_jax.main", ["--config=configs/multimodel.py:huge"], "huge"),
  "main_missing_config_file": ("mm_jax.main", ["--config=configs/nope.py"], "configs/nope.py"),
  "main_missing_config_flag": ("mm_jax.main", [], "--config"),
  "main_stray_argument": ("mm_jax.main", [TINY, "stray"], "stray"),
  "main_empty_workdir": ("mm_jax.main", [TINY, "--workdir="], "--workdir is empty"),
  "main_unwritable_workdir": ("mm_jax.main", [TINY, "--workdir=FILE/work"], "not writable"),
  # mm_jax.predict: inputs are checked before the model is restored.
  "predict_png_bomb": ("mm_jax.predict", [*PREDICT_IMAGE, "BOMB_PNG"], "50,000,000-pixel limit"),
  "predict_truncated_png": (
    "mm_jax.predict",
    [*PREDICT_IMAGE, "TRUNCATED_PNG"],
    "not a readable PNG or JPEG",
  ),
  "predict_gif": ("mm_jax.predict", [*PREDICT_IMAGE, "GIF"], "not a readable PNG or JPEG"),
  "predict_corrupt_wav": ("mm_jax.predict", [*PREDICT_SPEECH, "CORRUPT_WAV"], "not a readable WAV"),
  "predict_wav_zero_hz": ("mm_jax.predict", [*PREDICT_SPEECH, "ZERO_HZ_WAV"], "says 0 Hz"),
  "predict_wav_one_hz": ("mm_jax.predict", [*PREDICT_SPEECH, "ONE_HZ_WAV"], "says 1 Hz"),
  "predict_wav_too_long": (
    "mm_jax.predict",
    [*PREDICT_SPEECH, "LONG_WAV"],
    "longer than this model's",
  ),
  "predict_missing_file": ("mm_jax.predict", [*PREDICT_IMAGE, "FILE.png"], "no such file"),
  "predict_not_utf8": ("mm_jax.predict", [*PREDICT, "NOT_UTF8"], "not UTF-8 text"),
  "predict_empty_sentence": ("mm_jax.predict", [*PREDICT, " "], "empty sentence"),
  "predict_beam_size_zero": ("mm_jax.predict", [*PREDICT, "--beam_size=0", "hi"], "--beam_size=0"),
  "predict_config_mismatch": (
    "mm_jax.predict",
    [*PREDICT, TINY3, "--config.model.d=64", "--config.data.data_dir=DATA", "hi"],
    "--config does not match the checkpoint",
  ),
  "predict_missing_config": (
    "mm_jax.predict",
    [*PREDICT, "--config=configs/nope.py", "hi"],
    "configs/nope.py: no such file",
  ),
  "predict_unknown_task": (
    "mm_jax.predict",
    ["--workdir=TRAINED", "--task=image_captioning", "x"],
    "unknown task 'image_captioning'",
  ),
  "predict_no_checkpoint": (
    "mm_jax.predict",
    ["--workdir=WORK", "--task=translate_en_de", TINY, "hi"],
    "no checkpoint",
  ),
  "predict_nothing_to_predict": ("mm_jax.predict", PREDICT, "nothing to predict"),
  "predict_missing_batch_file": (
    "mm_jax.predict",
    [*PREDICT, "--batch_file=FILE.txt"],
    "no such file",
  ),
  "predict_unknown_flag": ("mm_jax.predict", [*PREDICT, "--tsk=x"], "tsk"),
  "predict_missing_workdir_flag": ("mm_jax.predict", ["--task=x", "hi"], "--workdir"),
  # mm_jax.evaluate
  "evaluate_beam_size_zero": ("mm_jax.evaluate", ["--workdir=TRAINED", "--beam_size=0"], "=0"),
  "evaluate_zero_batches": ("mm_jax.evaluate", ["--workdir=TRAINED", "--eval_batches=0"], "=0"),
  "evaluate_run_config_evaluates_nothing": (
    "mm_jax.evaluate",
    ["--workdir=TRAINED"],
    "config.train.eval_batches=0",
  ),
  "evaluate_unknown_task": (
    "mm_jax.evaluate",
    ["--workdir=TRAINED", "--tasks=nosuch", "--eval_batches=1"],
    "unknown task(s) ['nosuch']",
  ),
  "evaluate_missing_config": (
    "mm_jax.evaluate",
    ["--workdir=WORK", "--config=configs/nope.py"],
    "configs/nope.py: no such file",
  ),
  "evaluate_no_checkpoint": ("mm_jax.evaluate", ["--workdir=WORK", TINY], "no checkpoint"),
  "evaluate_truncated_tfrecords": (
    "mm_jax.evaluate",
    ["--workdir=TRAINED", TINY3, "--config.data.data_dir=TRUNCATED", "--eval_batches=1"],
    "truncated or damaged",
  ),
  # mm_jax.data.inspect: the trainer's checks, data files included.
  "inspect_missing_config": ("mm_jax.data.inspect", ["--config=configs/nope.py"], "no such file"),
  "inspect_zero_batch": (
    "mm_jax.data.inspect",
    [TINY, "--config.data.global_batch_size=0"],
    "config.data.global_batch_size=0",
  ),
  "inspect_misspelt_field": ("mm_jax.data.inspect", [TINY, "--config.data.taks=x"], "taks"),
  "inspect_negative_examples": ("mm_jax.data.inspect", [TINY, "--examples=-1"], "--examples=-1"),
  "inspect_data_dir_is_a_file": (
    "mm_jax.data.inspect",
    [TINY, "--config.data.data_dir=FILE"],
    "is not a directory",
  ),
  "inspect_garbage_tokenizer": (
    "mm_jax.data.inspect",
    [TINY3, "--config.data.data_dir=BADTOKENIZER"],
    "not a sentencepiece model",
  ),
  # mm_jax.gallery: flags checked before any decoding.
  "gallery_negative_examples": (
    "mm_jax.gallery",
    ["--workdir=TRAINED", "--examples=-1"],
    "--examples=-1",
  ),
  "gallery_unwritable_output": (
    "mm_jax.gallery",
    ["--workdir=TRAINED", "--output_dir=/proc/x"],
    "--output_dir=/proc/x",
  ),
  "gallery_no_checkpoint": ("mm_jax.gallery", ["--workdir=WORK", TINY], "no checkpoint"),
  # mm_jax.aot
  "aot_missing_config": ("mm_jax.aot", ["--config=configs/nope.py"], "no such file"),
  "aot_unknown_topology": ("mm_jax.aot", [TINY, "--topology=v9-8"], "--topology='v9-8'"),
  "aot_zero_slices": ("mm_jax.aot", [TINY, "--num_slices=0"], "--num_slices=0"),
  "aot_bad_config": ("mm_jax.aot", [TINY, "--config.model.d=0"], "config.model.d=0"),
}


def _inputs(root) -> dict[str, str]:
  """The bad input files, by the word that stands for each in CASES."""
  import PIL.Image

  buffer = io.BytesIO()
  pixels = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
  PIL.Image.fromarray(pixels).save(buffer, "PNG")
  files = {
    "BOMB_PNG": png_declaring(30_000, 30_000),
    "TRUNCATED_PNG": buffer.getvalue()[:-30],
    "GIF": b"GIF89a" + b"\0" * 100,
    "CORRUPT_WAV": wav_bytes().replace(b"fmt ", b"fmx ", 1),
    "ZERO_HZ_WAV": with_rate(wav_bytes(), 0),
    "ONE_HZ_WAV": with_rate(wav_bytes(), 1),
    "LONG_WAV": wav_bytes(seconds=30),
  }
  paths = {}
  for name, data in files.items():
    path = root / name.lower()
    path.write_bytes(data)
    paths[name] = str(path)
  # As argv delivers bytes the shell could not decode: lone surrogates.
  paths["NOT_UTF8"] = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")
  return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data_dir):
  return trained_tiny.trained_workdir(tmp_path_factory, tiny_data_dir)


@pytest.fixture(scope="module")
def words(trained, tiny_data_dir, tmp_path_factory):
  """What each capitalised word of CASES stands for (but WORK, made per case)."""
  root = tmp_path_factory.mktemp("bad_inputs")
  plain = root / "plain_file"
  plain.write_text("not a directory")
  truncated, bad_tokenizer = root / "truncated", root / "bad_tokenizer"
  for copy in (truncated, bad_tokenizer):
    shutil.copytree(tiny_data_dir, copy)
  record = sorted(truncated.glob("embedded_tiny/mm_embedded_speech/*/*-train.tfrecord-*"))[0]
  record.write_bytes(record.read_bytes()[:-100])
  tokenizers = sorted(bad_tokenizer.glob("tokenizer/*.model"))
  assert tokenizers, "the trained run's tokenizer is missing"
  for path in tokenizers:
    path.write_bytes(b"not a sentencepiece model")
  return {
    "TRAINED": str(trained),
    "DATA": str(tiny_data_dir),
    "TRUNCATED": str(truncated),
    "BADTOKENIZER": str(bad_tokenizer),
    "FILE": str(plain),
    **_inputs(root),
  }


def _substitute(args, words):
  out = []
  for arg in args:
    for word in sorted(words, key=len, reverse=True):  # TRUNCATED_PNG before TRUNCATED
      arg = arg.replace(word, words[word])
    out.append(arg)
  return out


def _main_module():
  """mm_jax.main, imported here without its start-up's process-wide effects: the re-execution
  under a tuned allocator (opted out by its variable) and its SIGTERM handler."""
  if "mm_jax.main" not in sys.modules:
    os.environ.setdefault("MM_JAX_MALLOC_TUNED", "1")
    handler = signal.getsignal(signal.SIGTERM)
    importlib.import_module("mm_jax.main")
    signal.signal(signal.SIGTERM, handler)
  return sys.modules["mm_jax.main"]


def run_in_process(module_name: str, args: list[str], monkeypatch) -> tuple[int, str]:
  """(exit status, stderr) of `python -m module_name args`, run here with fresh flag values."""
  module = _main_module() if module_name == "mm_jax.main" else importlib.import_module(module_name)
  values = flags.FlagValues()
  module.define_flags(values)
  argv = [module_name, *args]
  monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads --config.* overrides from it
  stderr = io.StringIO()
  status = 0
  with contextlib.redirect_stderr(stderr):
    try:
      module.main(cli.parse_flags(argv, values), values)
    except SystemExit as stop:
      status = stop.code if isinstance(stop.code, int) else 1
  return status, stderr.getvalue()


def _listing(path) -> list:
  """Every file below `path` with its size and modification time ([] when it does not exist)."""
  if not os.path.exists(path):
    return []
  return sorted(
    (os.path.join(d, f), os.path.getsize(os.path.join(d, f)), os.stat(os.path.join(d, f)).st_mtime)
    for d, _, files in os.walk(path)
    for f in files
  )


def _check_one_line(status: int, stderr: str, text: str):
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert status != 0, stderr
  assert "Traceback" not in stderr, stderr[-3000:]
  assert len(lines) == 1, stderr[-3000:]
  assert text in lines[0], lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(name, words, tmp_path, monkeypatch):
  module, args, text = CASES[name]
  workdir = tmp_path / "work"
  args = _substitute(args, {**words, "WORK": str(workdir)})
  if module == "mm_jax.main" and not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={workdir}")
  before = _listing(words["TRAINED"])
  status, stderr = run_in_process(module, args, monkeypatch)
  _check_one_line(status, stderr, text)
  assert _listing(workdir) == [], "the workdir was written"
  assert _listing(words["TRAINED"]) == before, "the trained run's directory was written"


def _run(module: str, args: list[str], env: dict | None = None):
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=REPO,
    env={k: v for k, v in env.items() if v is not None},
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_config_file_that_does_not_parse_is_one_line(tmp_path):
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n  pass\n")
  result = _run("mm_jax.main", [f"--config={broken}", f"--workdir={tmp_path / 'work'}"])
  _check_one_line(result.returncode, result.stderr, "invalid syntax")
  assert "broken.py" in result.stderr and "\\" not in result.stderr
  assert not (tmp_path / "work").exists()


def test_missing_config_file_with_an_override_is_one_line(tmp_path):
  """absl reads the file while parsing the overrides: that is where the traceback came from."""
  args = ["--config=configs/nope.py", "--config.seed=1", f"--workdir={tmp_path / 'work'}"]
  result = _run("mm_jax.main", args)
  _check_one_line(result.returncode, result.stderr, "configs/nope.py: no such file")
  assert not (tmp_path / "work").exists()


def test_no_tpu_probe_noise_on_a_cpu_machine(tmp_path):
  """JAX_PLATFORMS unset, as a user's shell has it: beside the trainer's own log lines the error
  is the only line, whatever libtpu is installed (mm_jax/backend.py keeps its probe off a
  machine without a TPU). The config is refused after JAX has looked for devices."""
  args = [TINY, "--config.mesh.data=3", f"--workdir={tmp_path / 'work'}"]
  result = _run("mm_jax.main", args, env={"JAX_PLATFORMS": None})
  own_log = re.compile(r"^I\d{4} [\d:.]+ +\d+ main\.py:\d+\] ")
  stderr = "".join(line for line in result.stderr.splitlines(True) if not own_log.match(line))
  _check_one_line(result.returncode, stderr, "config.mesh")
  assert _listing(tmp_path / "work") == []
