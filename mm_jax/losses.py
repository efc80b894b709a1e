"""Per-example losses and accuracies for the two kinds of output (language, categorical).

Everything is returned per example (summed over that example's real target tokens, plus the token
count), so the trainer can split a batch that concatenates several tasks back into per-task means.
"""

import jax
import jax.numpy as jnp


def smoothed_cross_entropy(logits, labels, label_smoothing: float):
  """Cross-entropy against a label-smoothed one-hot target, minus its own entropy.

  Subtracting the smoothed target's entropy makes a perfect prediction score 0, so the reported
  loss stays comparable to the unsmoothed log-perplexity.
  """
  num_classes = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  confidence = 1.0 - label_smoothing
  low = label_smoothing / max(num_classes - 1, 1)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  target_log_prob = jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  if label_smoothing == 0.0:
    return -target_log_prob
  sum_log_probs = jnp.sum(log_probs, axis=-1)
  loss = -(confidence * target_log_prob + low * (sum_log_probs - target_log_prob))
  normalizer = -(confidence * jnp.log(confidence) + (num_classes - 1) * low * jnp.log(low + 1e-20))
  return loss - normalizer


def example_stats(logits, targets, target_modality: str, label_smoothing: float):
  """Per-example sums: training loss, log-perplexity, correct tokens, token count."""
  if target_modality == "categorical":
    weights = jnp.ones(targets.shape, jnp.float32)
    loss = smoothed_cross_entropy(logits, targets, label_smoothing)
    nll = smoothed_cross_entropy(logits, targets, 0.0)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return {"loss": loss, "nll": nll, "correct": correct, "tokens": weights}
  weights = (targets != 0).astype(jnp.float32)
  loss = smoothed_cross_entropy(logits, targets, label_smoothing) * weights
  nll = smoothed_cross_entropy(logits, targets, 0.0) * weights
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32) * weights
  return {
    "loss": loss.sum(-1),
    "nll": nll.sum(-1),
    "correct": correct.sum(-1),
    "tokens": weights.sum(-1),
  }
