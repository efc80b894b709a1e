"""Text to 16 kHz int16 speech with the libespeak-ng that the espeakng-loader wheel ships (ctypes).

The library keeps global state, so one `Espeak` serves the whole process. Its output is not
reproducible: the same call twice gives waveforms that differ by a few samples (seeding libc or
espeak_ng_SetRandSeed does not help), so callers cache what they synthesise (`SpeechCache`).
"""

import ctypes
import dataclasses
import functools
import hashlib
import os
import tempfile

import numpy as np
from scipy import signal

SAMPLE_RATE = 16_000

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH, _RANGE = 1, 3, 4  # espeak_PARAMETER values
_CALLBACK = ctypes.CFUNCTYPE(
  ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


@dataclasses.dataclass(frozen=True)
class Voice:
  """One way of saying a sentence: an espeak voice name (with +variant), words/minute, pitch."""

  name: str
  rate: int
  pitch: int
  pitch_range: int

  def key(self, text: str) -> str:
    spec = f"{self.name}|{self.rate}|{self.pitch}|{self.pitch_range}|{text}"
    return hashlib.sha256(spec.encode()).hexdigest()[:32]


class Espeak:
  def __init__(self):
    import espeakng_loader  # deferred: only speech builds need it

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [
      ctypes.c_char_p,
      ctypes.c_size_t,
      ctypes.c_uint,
      ctypes.c_int,
      ctypes.c_uint,
      ctypes.c_uint,
      ctypes.c_void_p,
      ctypes.c_void_p,
    ]
    data_path = espeakng_loader.get_data_path().encode()
    self.native_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, 0)
    if self.native_rate <= 0:
      raise RuntimeError(f"espeak_Initialize failed ({self.native_rate})")
    self._chunks: list[np.ndarray] = []
    self._callback = _CALLBACK(self._collect)  # keep a reference: the library holds the pointer
    lib.espeak_SetSynthCallback(self._callback)
    self._lib = lib
    gcd = np.gcd(SAMPLE_RATE, self.native_rate)
    self._up, self._down = SAMPLE_RATE // gcd, self.native_rate // gcd

  def _collect(self, wav, num_samples, events) -> int:
    del events
    if num_samples > 0 and wav:
      self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
    return 0  # 0 = keep synthesising

  def native(self, text: str, voice: Voice) -> np.ndarray:
    """int16 samples at the library's own rate (22,050 Hz)."""
    lib = self._lib
    if lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
      raise ValueError(f"espeak-ng has no voice {voice.name!r}")
    lib.espeak_SetParameter(_RATE, voice.rate, 0)
    lib.espeak_SetParameter(_PITCH, voice.pitch, 0)
    lib.espeak_SetParameter(_RANGE, voice.pitch_range, 0)
    self._chunks = []
    encoded = text.encode()
    flags = _CHARS_UTF8
    if lib.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, flags, None, None):
      raise RuntimeError(f"espeak_Synth failed on {text!r}")
    lib.espeak_Synchronize()
    return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)

  def __call__(self, text: str, voice: Voice) -> np.ndarray:
    """int16 samples at 16 kHz."""
    wave = self.native(text, voice).astype(np.float32)
    resampled = signal.resample_poly(wave, self._up, self._down)
    return np.clip(np.round(resampled), -32768, 32767).astype(np.int16)


@functools.cache
def engine() -> Espeak:
  return Espeak()


class SpeechCache:
  """Synthesised audio by `Voice.key`, kept as npz chunks in a directory (one chunk per build).

  Each chunk is written to a temporary file and renamed, so an interrupted build leaves no partial
  chunk; a later build reuses every chunk, making rebuilds bit-identical.
  """

  def __init__(self, directory: str):
    self.directory = directory
    self._audio: dict[str, np.ndarray] = {}
    self._new: dict[str, np.ndarray] = {}
    if os.path.isdir(directory):
      for name in sorted(os.listdir(directory)):
        if name.endswith(".npz"):
          self._load_chunk(os.path.join(directory, name))

  def _load_chunk(self, path: str):
    with np.load(path) as chunk:
      keys, offsets, samples = chunk["keys"], chunk["offsets"], chunk["samples"]
    for i, key in enumerate(keys):
      self._audio.setdefault(str(key), samples[offsets[i] : offsets[i + 1]])

  def __len__(self) -> int:
    return len(self._audio)

  def get(self, text: str, voice: Voice) -> np.ndarray:
    key = voice.key(text)
    if key not in self._audio:
      self._audio[key] = self._new[key] = engine()(text, voice)
    return self._audio[key]

  def flush(self):
    """Writes what was synthesised since the last flush as one new chunk."""
    if not self._new:
      return
    os.makedirs(self.directory, exist_ok=True)
    keys = sorted(self._new)
    lengths = [len(self._new[k]) for k in keys]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    samples = np.concatenate([self._new[k] for k in keys])
    digest = hashlib.sha256("".join(keys).encode()).hexdigest()[:16]
    fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
      np.savez(f, keys=np.array(keys), offsets=offsets, samples=samples)
    os.chmod(tmp, 0o644)
    os.replace(tmp, os.path.join(self.directory, f"chunk-{digest}.npz"))
    self._new = {}
