"""Each field's standard metric, computed from decoded outputs with maintained libraries."""

import jiwer
import numpy as np
import sacrebleu


def bleu(hypotheses: list[str], references: list[str]) -> float:
  """Corpus BLEU (sacrebleu's default 13a tokenisation), 0–100."""
  return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def word_error_rate(hypotheses: list[str], references: list[str]) -> float:
  """WER in percent, via jiwer; empty references are skipped (WER is undefined for them)."""
  pairs = [(h, r) for h, r in zip(hypotheses, references) if r.strip()]
  if not pairs:
    return float("nan")
  hyps, refs = zip(*pairs)
  return 100.0 * float(jiwer.wer(list(refs), [h if h.strip() else "" for h in hyps]))


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Percent of examples whose label is among the k highest logits."""
  top = np.argsort(-logits, axis=-1)[:, :k]
  return 100.0 * float(np.mean(np.any(top == labels[:, None], axis=-1)))


def corpus_bracket_f1(hypotheses: list[str], references: list[str]) -> float:
  """Labelled bracket F1 (0–100) over the corpus: matched brackets summed as evalb does."""
  from mm_jax.data import trees

  counts = [trees.bracket_counts(h, r) for h, r in zip(hypotheses, references)]
  totals = [sum(column) for column in zip(*counts)] if counts else [0, 0, 0]
  return 100.0 * trees.precision_recall_f1(*totals)[2]


def exact_match(hypotheses: list[str], references: list[str]) -> float:
  """Percent of outputs equal to their reference token for token."""
  same = [h.split() == r.split() for h, r in zip(hypotheses, references)]
  return 100.0 * float(np.mean(same)) if same else float("nan")


# Metric name (as listed by a task in the registry) -> function of (hypotheses, references).
TEXT_METRICS = {
  "bleu": bleu,
  "wer": word_error_rate,
  "bracket_f1": corpus_bracket_f1,
  "tree_exact": exact_match,
}
