"""Log-mel spectrogram frames for the audio modality, in tf so they run inside tf.data.

16 kHz input, 25 ms windows every 10 ms (the usual ASR front end), log of mel energies, then per
utterance mean/variance normalisation per bin so loudness and channel differences wash out.
"""

import tensorflow as tf

SAMPLE_RATE = 16_000
WINDOW = 400  # 25 ms
HOP = 160  # 10 ms
FFT = 512
LOWER_HZ, UPPER_HZ = 20.0, 7600.0


def num_frames(num_samples):
  """Frames log_mel makes from this many samples (short clips are padded to one window)."""
  return 1 + tf.maximum(num_samples - WINDOW, 0) // HOP


def samples_for_frames(frames: int) -> int:
  return WINDOW + (frames - 1) * HOP


def log_mel(waveform: tf.Tensor, num_mel_bins: int) -> tf.Tensor:
  """int16 or float [N] samples at 16 kHz -> float32 [num_frames(N), num_mel_bins]."""
  x = tf.cast(waveform, tf.float32)
  if waveform.dtype == tf.int16:
    x = x / 32768.0
  x = tf.pad(x, [[0, tf.maximum(WINDOW - tf.shape(x)[0], 0)]])
  stft = tf.signal.stft(x, frame_length=WINDOW, frame_step=HOP, fft_length=FFT)
  power = tf.math.square(tf.abs(stft))
  mel_matrix = tf.signal.linear_to_mel_weight_matrix(
    num_mel_bins, FFT // 2 + 1, SAMPLE_RATE, LOWER_HZ, UPPER_HZ
  )
  mel = tf.math.log(tf.tensordot(power, mel_matrix, 1) + 1e-6)
  mean, variance = tf.nn.moments(mel, axes=[0], keepdims=True)
  return (mel - mean) * tf.math.rsqrt(variance + 1e-5)
