"""One sentencepiece model for every text in the mixture: English, German, French, parse trees.

Trained once from the training splits of the selected mixture's text tasks and stored beside the
data, keyed by mixture, vocabulary size and text tasks, so later runs (and other hosts) load it.
Ids: pad 0, eos 1, unk 2, no bos. Small vocabularies get a character coverage that fits them and
may come out below the configured size (never above), which the model's embedding tolerates.
"""

import collections
import hashlib
import io
import os
from collections.abc import Iterable, Sequence

import sentencepiece as spm
from etils import epath

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
_SPECIALS = 3


class Tokenizer:
  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text) + [EOS_ID]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [ids + [EOS_ID] for ids in self._sp.encode(list(texts))]

  def decode(self, ids: Iterable[int]) -> str:
    """Text up to the first EOS; padding dropped."""
    kept = []
    for i in ids:
      i = int(i)
      if i == EOS_ID:
        break
      if i != PAD_ID:
        kept.append(i)
    return self._sp.decode(kept)

  def pieces(self, text: str) -> list[str]:
    return self._sp.encode(text, out_type=str)


def model_path(root: str, mixture: str, vocab_size: int, text_tasks: Sequence[str]) -> str:
  digest = hashlib.sha1(",".join(sorted(text_tasks)).encode()).hexdigest()[:10]
  return os.path.join(root, "tokenizer", f"{mixture}-v{vocab_size}-{digest}.model")


def _coverage_for(texts: Sequence[str], vocab_size: int) -> float:
  """Character coverage that leaves at least half the vocabulary for multi-character pieces."""
  counts = collections.Counter(ch for t in texts for ch in t if not ch.isspace())
  budget = max(vocab_size // 2 - _SPECIALS, 1)
  if len(counts) <= budget:
    return 1.0
  total = sum(counts.values())
  kept = sum(c for _, c in counts.most_common(budget))
  return max(0.98, min(0.9995, kept / total - 1e-6))  # sentencepiece accepts >= 0.98


def train(texts: Sequence[str], vocab_size: int, user_symbols: Sequence[str] = ()) -> Tokenizer:
  """A unigram model over `texts`; deterministic for the same texts and arguments."""
  texts = [t for t in texts if t.strip()]
  if not texts:
    raise ValueError("tokenizer: no training text (are the selected tasks' train splits empty?)")
  symbols = [s for s in dict.fromkeys(user_symbols) if s]
  symbols = symbols[: max(vocab_size // 8, 0)]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(texts),
    model_writer=model,
    model_type="unigram",
    vocab_size=vocab_size,
    hard_vocab_limit=False,
    character_coverage=_coverage_for(texts, vocab_size),
    byte_fallback=vocab_size >= 2048,
    pad_id=PAD_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
    bos_id=-1,
    user_defined_symbols=symbols,
    input_sentence_size=2_000_000,
    shuffle_input_sentence=True,
    max_sentence_length=8192,
    num_threads=2,
    minloglevel=2,
  )
  return Tokenizer(model.getvalue())


def load(path: str) -> Tokenizer:
  """ConfigError (one line, the path and the fix) for a file that is not a sentencepiece model."""
  from mm_jax.errors import ConfigError

  try:
    return Tokenizer(epath.Path(path).read_bytes())
  except (OSError, RuntimeError) as error:  # sentencepiece: RuntimeError on a bad model proto
    reason = getattr(error, "strerror", None) or "not a sentencepiece model"
    raise ConfigError(
      f"tokenizer {path}: {reason}: delete it, and the next run trains it again from the data"
    ) from None


def save(tokenizer: Tokenizer, path: str) -> None:
  """Write-then-rename, so concurrent hosts never read half a model (local or gs:// paths)."""
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f"{target.name}.tmp{os.getpid()}"
  tmp.write_bytes(tokenizer.model_proto)
  tmp.replace(target)


def tree_symbols(trees: Sequence[str], vocab_size: int) -> list[str]:
  from mm_jax.data import trees as trees_lib

  # With the word-boundary mark, "(NP" after a space is one piece instead of "▁" + "(NP".
  return ["\u2581" + t for t in trees_lib.frequent_tokens(trees, vocab_size // 8)]
