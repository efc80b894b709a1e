"""mm_jax.predict refuses bad input files and text with one PredictError line, checking headers
before decoding: no model is needed to see it."""

import io
import struct
import zlib

import numpy as np
import PIL.Image
import pytest
import scipy.io.wavfile

from configs.multimodel import get_config
from mm_jax import predict
from mm_jax.data import layout


@pytest.fixture(scope="module")
def config():
  return get_config("tiny")


@pytest.fixture(scope="module")
def image_task(config):
  return layout.build_tasks(config)["image_classification"]


def png_bytes(width=40, height=30) -> bytes:
  pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  PIL.Image.fromarray(pixels).save(buffer, "PNG")  # noise: a few kB that truncation can cut
  return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
  """A PNG whose header claims width x height pixels, followed by almost no data."""

  def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def wav_bytes(seconds=0.5, rate=16_000) -> bytes:
  buffer = io.BytesIO()
  t = np.arange(int(seconds * rate)) / rate
  scipy.io.wavfile.write(buffer, rate, (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16))
  return buffer.getvalue()


def with_rate(data: bytes, rate: int) -> bytes:
  """The same WAV with its header's sample rate (and byte rate) replaced."""
  pos = data.index(b"fmt ") + 8
  return data[: pos + 4] + struct.pack("<II", rate, rate * 2) + data[pos + 12 :]


def test_a_valid_png_and_wav_still_read(config, image_task):
  assert predict.image_example(config, image_task, png_bytes())["inputs"].shape[-1] == 3
  samples = predict.read_wav(wav_bytes(), "ok.wav", predict.max_audio_seconds(config))
  assert samples.dtype == np.int16 and len(samples) == 8000


@pytest.mark.parametrize(
  "data,message",
  [
    (png_declaring(30_000, 30_000), "over the 50,000,000-pixel limit"),
    (png_declaring(8_000, 8_000), "8000x8000 pixels is over the 50,000,000-pixel limit"),
    (png_bytes()[:200], "not a readable PNG or JPEG"),
    (png_bytes()[:-30], "not a readable PNG or JPEG"),
    (b"GIF89a" + b"\0" * 100, "not a readable PNG or JPEG"),
  ],
  ids=["bomb", "too_many_pixels", "truncated_early", "truncated_late", "not_png"],
)
def test_bad_images_are_one_line(config, image_task, data, message):
  with pytest.raises(predict.PredictError, match=message) as info:
    predict.image_example(config, image_task, data, "x.png")
  assert "\n" not in str(info.value) and str(info.value).startswith("x.png: ")


@pytest.mark.parametrize(
  "data,message",
  [
    (wav_bytes().replace(b"fmt ", b"fmx ", 1), "not a readable WAV"),  # scipy: UnboundLocalError
    (with_rate(wav_bytes(), 0), "says 0 Hz"),
    (with_rate(wav_bytes(), 1), "says 1 Hz"),
    (with_rate(wav_bytes(seconds=2), 4_000), "longer than this model's"),
    (wav_bytes()[:30], "not a readable WAV"),
    (b"RIFF\0\0\0\0WAVEjunk", "not a readable WAV"),
  ],
  ids=["no_fmt_chunk", "zero_hz", "one_hz", "too_long", "truncated_header", "no_chunks"],
)
def test_bad_wavs_are_refused_from_the_header(config, data, message):
  with pytest.raises(predict.PredictError, match=message) as info:
    predict.read_wav(data, "x.wav", predict.max_audio_seconds(config))
  assert "\n" not in str(info.value) and str(info.value).startswith("x.wav: ")


def test_text_that_is_not_utf8_is_refused(config):
  task = layout.build_tasks(config)["translate_en_de"]
  not_utf8 = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # as argv delivers it
  with pytest.raises(predict.PredictError, match="not UTF-8 text"):
    predict.text_example(config, task, None, not_utf8)
