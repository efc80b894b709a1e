"""The shared sentencepiece model: ids, round trips over German/French/trees, load-not-retrain."""

import random

import pytest

from configs.multimodel import get_config
from mm_jax.data import pipeline, tokenizer, trees

GERMAN = "Die Größe der Schriftart über dem Mädchen ist schön."
FRENCH = "Où est l'élève ? Le garçon a été très ému à Noël."
TREE = trees.penn_to_example(
  "(S (NP (DT The) (NN cat)) (VP (VBZ sits) (PP (IN on) (NP (DT the) (NN mat)))) (. .))"
)[1]


def _corpus():
  rng = random.Random(0)
  words = (GERMAN + " " + FRENCH + " the cat sits on a mat near my house").split()
  sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
  return sentences + [GERMAN, FRENCH] * 20 + [TREE] * 200


@pytest.fixture(scope="module")
def tok():
  corpus = _corpus()
  symbols = ["\u2581" + t for t in trees.frequent_tokens([TREE], 32)]
  return tokenizer.train(corpus, 256, user_symbols=symbols)


def test_special_ids_and_eos(tok):
  ids = tok.encode(GERMAN)
  assert ids[-1] == tokenizer.EOS_ID and tokenizer.PAD_ID not in ids
  assert tok._sp.pad_id() == 0 and tok._sp.eos_id() == 1 and tok._sp.unk_id() == 2
  assert tok._sp.bos_id() == -1
  assert 3 < tok.vocab_size <= 256


@pytest.mark.parametrize("text", [GERMAN, FRENCH, TREE])
def test_round_trip(tok, text):
  ids = tok.encode(text)
  assert tokenizer.UNK_ID not in ids
  assert tok.decode(ids) == text
  # Padding after EOS and anything past EOS are ignored.
  assert tok.decode([*ids, 0, 0, 5]) == text


def test_tree_brackets_are_single_pieces(tok):
  pieces = tok.pieces(TREE)
  assert "\u2581(NP" in pieces and "\u2581)NP" in pieces
  assert len(pieces) == len(TREE.split())


def test_small_vocabulary_narrows_character_coverage():
  common = "abcdefghijklmnopqrstuvwxyz"
  rng = random.Random(1)
  texts = ["".join(rng.choice(common) for _ in range(60)) for _ in range(400)]
  texts += [chr(0x4E00 + i) for i in range(200)]  # 200 rare characters, once each
  assert tokenizer._coverage_for(texts, 256) < 1.0
  model = tokenizer.train(texts, 256)
  assert model.vocab_size <= 256


def test_load_or_train_stores_beside_the_data_and_reloads(tmp_path, monkeypatch):
  config = get_config("tiny,tasks=translate_en_de")
  config.data.data_dir = str(tmp_path)
  calls = []

  def fake_text(cfg):
    calls.append(cfg)
    return _corpus()

  monkeypatch.setattr(pipeline, "tokenizer_training_text", fake_text)
  first = pipeline.load_or_train_tokenizer(config)
  path = tokenizer.model_path(str(tmp_path), "embedded-tiny", 256, ["translate_en_de"])
  assert (tmp_path / "tokenizer").is_dir() and path.startswith(str(tmp_path / "tokenizer"))
  second = pipeline.load_or_train_tokenizer(config)
  assert len(calls) == 1
  assert first.model_proto == second.model_proto
  # A different vocabulary size or task set is a different model.
  assert path != tokenizer.model_path(str(tmp_path), "embedded-tiny", 512, ["translate_en_de"])
  assert path != tokenizer.model_path(str(tmp_path), "embedded-tiny", 256, ["translate_en_fr"])
