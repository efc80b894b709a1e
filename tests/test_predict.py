"""predict on a PNG, a WAV and a sentence with a tiny trained checkpoint; one-line errors."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import scipy.io.wavfile
import trained_tiny
from xla_flags import xla_flags

from mm_jax import predict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_data_dir):
  return trained_tiny.trained_workdir(tmp_path_factory, tiny_data_dir)


@pytest.fixture(scope="module")
def trained(workdir):
  return predict.load_trained(str(workdir))


@pytest.fixture(scope="module")
def predictor(trained):
  return predict.Predictor(trained)


def _png(path, seed=0):
  rng = np.random.default_rng(seed)
  PIL.Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(path)
  return str(path)


def _wav(path, seconds=0.5, rate=16_000):
  t = np.arange(int(seconds * rate)) / rate
  scipy.io.wavfile.write(path, rate, (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16))
  return str(path)


def test_config_written_by_trainer(workdir):
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["data"]["tasks"] == "image_classification,speech_recognition,translate_en_de"


def test_png_gives_a_class(trained, predictor, tmp_path):
  task = trained.tasks["image_classification"]
  examples = [predict.make_example(trained, task, _png(tmp_path / f"{i}.png", i)) for i in range(3)]
  assert examples[0]["inputs"].shape == (28, 28, 3)
  outputs = predictor.outputs("image_classification", examples)
  logits = predictor.raw_outputs("image_classification", examples)
  # The printed class is the argmax of the model's logits, named by the dataset.
  names = predict.class_names(trained.config, task)
  assert outputs == [names[int(np.argmax(row))] for row in logits]


def test_wav_and_sentence_decode_like_the_decoder(trained, predictor, tmp_path):
  for task_name, user_input in (
    ("speech_recognition", _wav(tmp_path / "a.wav")),
    ("translate_en_de", "the cat sits on the mat"),
  ):
    task = trained.tasks[task_name]
    example = predict.make_example(trained, task, user_input)
    ids = predictor.raw_outputs(task_name, [example])[0]
    assert all(i > 1 for i in ids)  # no pad, no EOS inside the decoded ids
    assert predictor.outputs(task_name, [example]) == [predictor.detokenize(ids)]


def test_wav_at_another_rate_is_resampled(trained, tmp_path):
  task = trained.tasks["speech_recognition"]
  at_16k = predict.make_example(trained, task, _wav(tmp_path / "a.wav"))
  at_8k = predict.make_example(trained, task, _wav(tmp_path / "b.wav", rate=8000))
  np.testing.assert_array_equal(at_16k["inputs_mask"], at_8k["inputs_mask"])


def test_command_line_sentence_and_batch_file(workdir, tmp_path):
  batch = tmp_path / "inputs.txt"
  batch.write_text("hello world\n\nthe dog\n")
  result = _cli(workdir, "--task=translate_en_de", "a sentence", f"--batch_file={batch}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert len(result.stdout.splitlines()) == 3


def test_memory_on_the_largest_refused_input_stays_below_a_valid_one(workdir, tmp_path):
  """The largest file predict reads (just under its size limit), a WAV whose header claims 26
  minutes of audio: refused from the header, never decoded or resampled, and before the model is
  built. Its peak resident memory may exceed a valid input's by the file itself at most."""
  valid = _cli(workdir, "--task=speech_recognition", _wav(tmp_path / "ok.wav"))
  assert valid.returncode == 0, valid.stderr[-2000:]
  huge = tmp_path / "huge.wav"
  samples = (predict.MAX_FILE_BYTES - 1024) // 2
  scipy.io.wavfile.write(huge, 16_000, np.zeros(samples, np.int16))
  refused = _cli(workdir, "--task=speech_recognition", str(huge))
  assert refused.returncode == 2 and "longer than this model's" in refused.stderr
  print(f"peak resident memory: valid {valid.peak_mb:.0f} MB, refused {refused.peak_mb:.0f} MB")
  assert refused.peak_mb <= valid.peak_mb + 100


# Runs the command given as arguments and prints its peak resident memory (kB) last on stderr.
# The command is forked from this small process: a child's peak counts its parent's resident
# memory at the fork (Linux carries it over fork and exec), and the test process is gigabytes.
_MEASURED = """
import resource, subprocess, sys
status = subprocess.call(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(status)
"""


def _cli(workdir, *args):
  """The command's result, with `peak_mb`: its peak resident memory."""
  command = [sys.executable, "-m", "mm_jax.predict", f"--workdir={workdir}", *args]
  result = subprocess.run(
    [sys.executable, "-c", _MEASURED, *command],
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "XLA_FLAGS": xla_flags(None)},
  )
  result.stderr, _, peak_kb = result.stderr.rstrip("\n").rpartition("\n")
  result.peak_mb = int(peak_kb) / 1024  # kilobytes on Linux
  return result


def test_errors_are_one_line(trained, workdir, tmp_path):
  task = trained.tasks["image_classification"]
  with pytest.raises(predict.PredictError, match="no such file"):
    predict.make_example(trained, task, str(tmp_path / "missing.png"))
  (tmp_path / "bad.png").write_bytes(b"not an image at all")
  with pytest.raises(predict.PredictError, match="not a readable PNG or JPEG"):
    predict.make_example(trained, task, str(tmp_path / "bad.png"))
  with pytest.raises(predict.PredictError, match="not a readable WAV"):
    predict.make_example(trained, trained.tasks["speech_recognition"], str(tmp_path / "bad.png"))
  with pytest.raises(predict.PredictError, match="longer than this model"):
    predict.make_example(trained, trained.tasks["speech_recognition"], _wav(tmp_path / "l.wav", 60))
  big = tmp_path / "big.png"
  big.write_bytes(b"\0" * (predict.MAX_FILE_BYTES + 1))
  with pytest.raises(predict.PredictError, match="MiB limit"):
    predict.make_example(trained, task, str(big))
  with pytest.raises(predict.PredictError, match="no checkpoint"):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((workdir / "config.json").read_text())
    predict.load_trained(str(tmp_path / "empty"))


def test_jpeg_is_read_like_png(trained, tmp_path):
  task = trained.tasks["image_classification"]
  image = PIL.Image.new("RGB", (20, 20), (200, 10, 10))
  buffer = io.BytesIO()
  image.save(buffer, "JPEG", quality=100)
  (tmp_path / "a.jpg").write_bytes(buffer.getvalue())
  image.save(tmp_path / "a.png")
  jpeg = predict.make_example(trained, task, str(tmp_path / "a.jpg"))["inputs"]
  png = predict.make_example(trained, task, str(tmp_path / "a.png"))["inputs"]
  np.testing.assert_allclose(jpeg, png, atol=0.05)
