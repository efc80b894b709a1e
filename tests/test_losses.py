"""Losses against float64 NumPy written here, and the optimizer's schedule by hand."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mm_jax import losses, optimizer


def _reference_smoothed_ce(logits, labels, eps):
  logits = logits.astype(np.float64)
  log_probs = (
    logits
    - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1))[..., None]
    - logits.max(-1, keepdims=True)
  )
  n = logits.shape[-1]
  target = np.full(logits.shape, eps / (n - 1))
  np.put_along_axis(target, labels[..., None], 1.0 - eps, axis=-1)
  cross = -np.sum(target * log_probs, -1)
  entropy = -np.sum(np.where(target > 0, target * np.log(np.maximum(target, 1e-300)), 0.0), -1)
  return cross - entropy


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_smoothed_cross_entropy_matches_numpy(eps):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
  labels = rng.integers(0, 11, size=(3, 5))
  got = np.asarray(losses.smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), eps))
  np.testing.assert_allclose(got, _reference_smoothed_ce(logits, labels, eps), rtol=1e-5, atol=1e-5)


def test_smoothed_cross_entropy_gradient_is_softmax_minus_target():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(4, 9)).astype(np.float32) * 3
  labels = rng.integers(0, 9, size=(4,))
  eps = 0.1
  grad = jax.grad(lambda x: losses.smoothed_cross_entropy(x, jnp.asarray(labels), eps).sum())(
    jnp.asarray(logits)
  )
  x = logits.astype(np.float64)
  softmax = np.exp(x - x.max(-1, keepdims=True))
  softmax /= softmax.sum(-1, keepdims=True)
  target = np.full(x.shape, eps / 8)
  np.put_along_axis(target, labels[:, None], 1.0 - eps, axis=-1)
  np.testing.assert_allclose(np.asarray(grad), softmax - target, atol=1e-6)


def test_a_tie_with_the_top_class_counts_as_correct():
  logits = jnp.asarray([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0]])
  stats = losses.example_stats(logits, jnp.asarray([2, 2]), "categorical", 0.0)
  np.testing.assert_array_equal(np.asarray(stats["correct"]), [1.0, 0.0])


def test_language_stats_ignore_padding():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 4, 7)).astype(np.float32)
  targets = np.array([[3, 5, 1, 0], [2, 1, 0, 0]])
  stats = losses.example_stats(jnp.asarray(logits), jnp.asarray(targets), "language", 0.0)
  np.testing.assert_array_equal(np.asarray(stats["tokens"]), [3, 2])
  ref = _reference_smoothed_ce(logits, targets, 0.0) * (targets != 0)
  np.testing.assert_allclose(np.asarray(stats["nll"]), ref.sum(-1), rtol=1e-5)
  argmax = logits.argmax(-1)
  np.testing.assert_array_equal(
    np.asarray(stats["correct"]), ((argmax == targets) & (targets != 0)).sum(-1)
  )


def test_categorical_stats():
  logits = np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]], np.float32)
  stats = losses.example_stats(jnp.asarray(logits), jnp.asarray([1, 2]), "categorical", 0.0)
  np.testing.assert_array_equal(np.asarray(stats["correct"]), [1.0, 0.0])
  np.testing.assert_array_equal(np.asarray(stats["tokens"]), [1.0, 1.0])


@pytest.mark.parametrize("decay", ["rsqrt", "cosine", "wsd", "constant"])
def test_schedule_warms_up_then_decays(decay):
  cfg = ml_collections.ConfigDict(
    {"learning_rate": 1.0, "warmup_steps": 10, "decay": decay, "cooldown_fraction": 0.25}
  )
  schedule = optimizer.learning_rate_schedule(cfg, num_steps=100)
  values = np.array([float(schedule(s)) for s in range(100)])
  np.testing.assert_allclose(values[:10], np.arange(1, 11) / 10, rtol=1e-6)
  assert values[9] == pytest.approx(1.0)
  if decay == "rsqrt":
    assert values[39] == pytest.approx(np.sqrt(10 / 40), rel=1e-6)
  elif decay == "cosine":
    assert values[-1] == pytest.approx(0.5 * (1 + np.cos(np.pi * 90 / 90)), abs=1e-6)
  elif decay == "wsd":  # the peak through step 74, then down by 1/25 a step: 24/25 ... 1/25, 0
    assert np.all(values[9:75] == 1.0)
    np.testing.assert_allclose(values[75:], np.arange(24, -1, -1) / 25, atol=1e-6)
  else:
    assert np.all(values[9:] == 1.0)


def _reference_ctc(log_probs, labels, blank=0):
  """-log P(labels | frames) by summing over every frame path that collapses to the labels."""
  import itertools

  total = 0.0
  for path in itertools.product(range(log_probs.shape[1]), repeat=log_probs.shape[0]):
    collapsed = [k for i, k in enumerate(path) if k != blank and (i == 0 or k != path[i - 1])]
    if collapsed == list(labels):
      total += np.exp(sum(log_probs[t, k] for t, k in enumerate(path)))
  return -np.log(total)


def test_ctc_alignment_loss_matches_path_enumeration():
  rng = np.random.default_rng(3)
  vocab, frames = 4, 5  # ids: 0 blank/pad, 1 EOS, 2-3 words
  logits = rng.normal(size=(3, frames, vocab)).astype(np.float32)
  frame_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], np.float32)
  # Row 2 has 3 labels but only 2 frames: no alignment exists, so it must count zero.
  targets = np.array([[2, 3, 3, 1, 0], [3, 2, 1, 0, 0], [2, 2, 3, 1, 0]], np.int32)
  got = float(losses.ctc_alignment_loss(jnp.asarray(logits), frame_mask, targets))
  want = []
  for b, labels in ((0, [2, 3, 3]), (1, [3, 2])):
    n = int(frame_mask[b].sum())
    x = logits[b, :n].astype(np.float64)
    log_probs = x - np.log(np.exp(x).sum(-1, keepdims=True))
    want.append(_reference_ctc(log_probs, labels) / len(labels))
  np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)
