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


def target_weights(targets, target_modality: str):
  """1 for each target token a loss is taken over (class labels: every one; text: non-padding)."""
  if target_modality == "categorical":
    return jnp.ones(targets.shape, jnp.float32)
  return (targets != 0).astype(jnp.float32)


def example_stats(logits, targets, target_modality: str, label_smoothing: float):
  """Per-example sums: training loss, log-perplexity, correct tokens, token count."""
  weights = target_weights(targets, target_modality)
  if target_modality == "categorical":
    loss = smoothed_cross_entropy(logits, targets, label_smoothing)
    nll = smoothed_cross_entropy(logits, targets, 0.0)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return {"loss": loss, "nll": nll, "correct": correct, "tokens": weights}
  loss = smoothed_cross_entropy(logits, targets, label_smoothing) * weights
  nll = smoothed_cross_entropy(logits, targets, 0.0) * weights
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32) * weights
  return {
    "loss": loss.sum(-1),
    "nll": nll.sum(-1),
    "correct": correct.sum(-1),
    "tokens": weights.sum(-1),
  }


def ctc_alignment_loss(logits, frame_mask, targets, eos_id: int = 1):
  """Mean per-token CTC loss of frame logits [B, T, V] against the target ids (blank = pad = 0).

  The auxiliary loss that makes an audio encoder keep what was said: EOS and padding are not
  labels. Examples with no labels, or more labels than frames (no alignment exists), count zero.
  """
  import optax  # noqa: PLC0415

  label_paddings = (targets <= eos_id).astype(jnp.float32)
  frame_paddings = 1.0 - frame_mask.astype(jnp.float32)
  per_example = optax.ctc_loss(logits.astype(jnp.float32), frame_paddings, targets, label_paddings)
  labels = jnp.sum(1.0 - label_paddings, axis=-1)
  feasible = (labels > 0) & (labels <= jnp.sum(frame_mask, axis=-1))
  per_token = jnp.where(feasible, per_example / jnp.maximum(labels, 1.0), 0.0)
  return jnp.sum(per_token) / jnp.maximum(jnp.sum(feasible), 1)
