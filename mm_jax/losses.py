"""Per-example losses and accuracies for the two kinds of output (language, categorical).

Everything is returned per example (summed over that example's real target tokens, plus the token
count), so the trainer can split a batch that concatenates several tasks back into per-task means.
"""

import jax
import jax.numpy as jnp


def _token_terms(logits, labels):
  """Per token: (target's log-prob, sum of all classes' log-probs, target's logit, top logit).

  One pass of exp over the logits serves the loss, the log-perplexity and the accuracy, which
  compares the target's logit with the top one instead of taking an argmax (XLA:CPU runs an
  argmax as a slow two-output reduction; the max is needed for the softmax anyway).
  """
  logits = logits.astype(jnp.float32)
  top = jnp.max(logits, axis=-1)
  shift = jax.lax.stop_gradient(top)
  log_normalizer = shift + jnp.log(jnp.sum(jnp.exp(logits - shift[..., None]), axis=-1))
  target_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  target_log_prob = target_logit - log_normalizer
  sum_log_probs = jnp.sum(logits, axis=-1) - logits.shape[-1] * log_normalizer
  return target_log_prob, sum_log_probs, target_logit, top


def _smoothed(target_log_prob, sum_log_probs, num_classes: int, label_smoothing: float):
  """Cross-entropy against a label-smoothed one-hot target, minus its own entropy.

  Subtracting the smoothed target's entropy makes a perfect prediction score 0, so the reported
  loss stays comparable to the unsmoothed log-perplexity.
  """
  if label_smoothing == 0.0:
    return -target_log_prob
  confidence = 1.0 - label_smoothing
  low = label_smoothing / max(num_classes - 1, 1)
  loss = -(confidence * target_log_prob + low * (sum_log_probs - target_log_prob))
  normalizer = -(confidence * jnp.log(confidence) + (num_classes - 1) * low * jnp.log(low + 1e-20))
  return loss - normalizer


def smoothed_cross_entropy(logits, labels, label_smoothing: float):
  """Per-token label-smoothed cross-entropy (0 for a perfect prediction; see `_smoothed`)."""
  target_log_prob, sum_log_probs, _, _ = _token_terms(logits, labels)
  return _smoothed(target_log_prob, sum_log_probs, logits.shape[-1], label_smoothing)


def target_weights(targets, target_modality: str):
  """1 for each target token a loss is taken over (class labels: every one; text: non-padding)."""
  if target_modality == "categorical":
    return jnp.ones(targets.shape, jnp.float32)
  return (targets != 0).astype(jnp.float32)


def example_stats(logits, targets, target_modality: str, label_smoothing: float):
  """Per-example sums: training loss, log-perplexity, correct tokens, token count.

  A token is correct when its target's logit is the top one (a tie with another class counts as
  correct, where an argmax would pick the lower class id).
  """
  weights = target_weights(targets, target_modality)
  target_log_prob, sum_log_probs, target_logit, top = _token_terms(logits, targets)
  stats = {
    "loss": _smoothed(target_log_prob, sum_log_probs, logits.shape[-1], label_smoothing),
    "nll": -target_log_prob,
    "correct": (target_logit >= top).astype(jnp.float32),
  }
  if target_modality == "categorical":
    return {**stats, "tokens": weights}
  return {**{k: (v * weights).sum(-1) for k, v in stats.items()}, "tokens": weights.sum(-1)}


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
