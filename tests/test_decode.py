"""Cached decoding equals full recomputation (greedy and beam), beam 1 is greedy, the MoE never
drops at inference, and the metrics agree with hand-computed values."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import multimodel as multimodel_config  # noqa: E402
from mm_jax import decode, metrics, run, sharding  # noqa: E402
from mm_jax.models.moe import MoE  # noqa: E402
from mm_jax.models.multimodel import MultiModel, TaskSignature  # noqa: E402

SIGNATURE = TaskSignature("language", "language")
LENGTH = 12  # decoded positions; the tiny config's largest receptive field is 57 positions
BATCH = 8


@functools.cache  # the MoE variant serves both `setup` and `moe_setup`: built and traced once
def _model_and_params(variant: str):
  config = multimodel_config.get_config(f"tiny,{variant}" if variant else "tiny")
  config.model.moe.noisy_gating = False
  config.model.moe.group_size = 16  # small groups: capacity routing would drop without eval care
  model = MultiModel(run.model_config(config.model, "cpu"))
  rng = np.random.default_rng(0)
  batch = {
    "inputs": jnp.asarray(rng.integers(2, 256, (BATCH, 10)) * (rng.random((BATCH, 10)) < 0.8)),
    "targets": jnp.asarray(rng.integers(2, 256, (BATCH, LENGTH)), jnp.int32),
    "target_space": jnp.asarray(rng.integers(0, 4, (BATCH,)), jnp.int32),
  }
  batch["inputs"] = batch["inputs"].at[:, 0].set(5).astype(jnp.int32)
  init = jax.jit(lambda b: model.init(jax.random.key(1), b, SIGNATURE, train=False)["params"])
  params = nn.unbox(init(batch))
  # Sharper than at init (varied tokens), the gate away from zero (the MoE routes), and EOS
  # likely enough that rows end at different positions.
  params = jax.tree.map(lambda x: 3 * x if x.ndim > 1 else x, params)
  gate = params["decoder"]["ffn"]["ffn"]["gate"] if variant == "" else None
  if gate is not None:
    params["decoder"]["ffn"]["ffn"]["gate"] = jax.random.normal(jax.random.key(2), gate.shape)
  # EOS becomes the top token at about a tenth of (teacher-forced) positions.
  forward = jax.jit(lambda p, b: model.apply({"params": p}, b, SIGNATURE, train=False)[0])
  logits = forward(params, batch)
  gap = np.quantile(np.asarray(logits.max(-1) - logits[..., decode.EOS]), 0.1)
  bias = params["language"]["softmax"]["bias"]
  params["language"]["softmax"]["bias"] = bias.at[decode.EOS].add(float(gap))
  return model, params, batch


@pytest.fixture(scope="module", params=["", "no_moe,no_attention"], ids=["moe", "dense_noattn"])
def setup(request):
  return _model_and_params(request.param)


@pytest.fixture(scope="module")
def moe_setup():
  return _model_and_params("")


def _jit(fn, model, **kwargs):
  return jax.jit(lambda p, b: fn(model, p, b, SIGNATURE, LENGTH, **kwargs))


@pytest.fixture(scope="module")
def greedy_reference(setup):
  model, params, batch = setup
  return np.asarray(_jit(decode.greedy_uncached, model)(params, batch))


def test_cached_greedy_equals_uncached(setup, greedy_reference):
  model, params, batch = setup
  tokens = np.asarray(_jit(decode.greedy, model)(params, batch))
  np.testing.assert_array_equal(tokens, greedy_reference)
  # The test is only meaningful if rows end at different places and the tokens vary.
  ends = [list(row).index(decode.EOS) if decode.EOS in row else LENGTH for row in tokens]
  assert len(set(ends)) > 1, ends
  assert len(np.unique(tokens)) > 4


def test_cached_beam_equals_uncached(moe_setup):
  model, params, batch = moe_setup
  cached = _jit(decode.beam_search, model, beam_size=3, alpha=0.6)(params, batch)
  uncached = _jit(decode.beam_search, model, beam_size=3, alpha=0.6, cached=False)(params, batch)
  np.testing.assert_array_equal(np.asarray(cached), np.asarray(uncached))
  # The beams searched: somewhere they found something other than the greedy path.
  greedy = _jit(decode.greedy, model)(params, batch)
  assert np.any(np.asarray(cached) != np.asarray(greedy))


def test_beam_of_one_is_greedy(setup, greedy_reference):
  model, params, batch = setup
  tokens = _jit(decode.beam_search, model, beam_size=1, alpha=0.6)(params, batch)
  np.testing.assert_array_equal(np.asarray(tokens), greedy_reference)


def test_sharded_cached_decoding_equals_unsharded(moe_setup, devices):
  """On a data x expert mesh with the training rules, cached greedy gives the same tokens."""
  model, params, batch = moe_setup
  reference = np.asarray(_jit(decode.greedy_uncached, model)(params, batch))
  mesh = sharding.make_mesh({"data": 4, "expert": 2, "model": 1}, devices)
  with sharding.activate(mesh, sharding.logical_rules()):
    sharded_batch = sharding.global_batch({k: np.asarray(v) for k, v in batch.items()}, mesh)
    tokens = _jit(decode.beam_search, model, beam_size=1, alpha=0.6)(params, sharded_batch)
  np.testing.assert_array_equal(np.asarray(tokens), reference)


def test_moe_never_drops_at_inference():
  """With every token routed to one expert, eval routing keeps all of them (capacity = group),
  so a token's output is the same alone and in a crowd; eval_drops=True would drop most."""
  d, tokens = 8, 32
  x = jax.random.normal(jax.random.key(0), (1, tokens, d))
  layer = lambda drops: MoE(8, k=2, hidden=16, group_size=32, noisy_gating=False, eval_drops=drops)
  variables = nn.unbox(layer(False).init(jax.random.key(1), x, train=False))
  gate = jnp.zeros((d, 8)).at[:, 0].set(10.0).at[:, 1].set(5.0)  # expert 0, then 1, for x > 0
  variables["params"]["gate"] = gate
  x = jnp.abs(x)

  @functools.partial(jax.jit, static_argnums=0)
  def run(drops, inputs):
    (y, _), state = layer(drops).apply(variables, inputs, train=False, mutable=["intermediates"])
    return y, state["intermediates"]["fraction_dropped"][0]

  crowd, dropped = run(False, x)
  assert dropped == 0.0
  alone = jnp.concatenate([run(False, x[:, i : i + 1])[0] for i in range(tokens)], axis=1)
  np.testing.assert_allclose(np.asarray(crowd), np.asarray(alone), rtol=1e-5, atol=1e-6)
  assert run(True, x)[1] > 0.4  # capacity factor 2.0 gives each expert 16 slots: half dropped


# --------------------------------------------------------------------------------------------
# Metrics against hand-computed values.


def test_bleu_known_values():
  # 7 words, one wrong at the end: n-gram precisions 6/7, 5/6, 4/5, 3/4, no brevity penalty.
  expected = 100 * math.exp(np.mean(np.log([6 / 7, 5 / 6, 4 / 5, 3 / 4])))
  assert metrics.bleu(["a b c d e f g"], ["a b c d e f h"]) == pytest.approx(expected, abs=1e-6)
  # All n-grams right but 6 of 8 words: brevity penalty exp(1 - 8/6).
  bleu = metrics.bleu(["a b c d e f"], ["a b c d e f g h"])
  assert bleu == pytest.approx(100 * math.exp(1 - 8 / 6), abs=1e-6)
  assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)


def test_word_error_rate_known_values():
  # "sat" -> "sit" substituted, "the" deleted: 2 errors over 6 reference words.
  wer = metrics.word_error_rate(["the cat sit on mat"], ["the cat sat on the mat"])
  assert wer == pytest.approx(100 * 2 / 6)
  # Corpus WER pools errors: (2 + 1 inserted) / (6 + 2); empty references are skipped.
  hyps = ["the cat sit on mat", "hello big world", "anything"]
  refs = ["the cat sat on the mat", "hello world", ""]
  assert metrics.word_error_rate(hyps, refs) == pytest.approx(100 * 3 / 8)


def test_bracket_f1_and_exact_match_by_hand():
  gold = "(S (NP w w )NP (VP w (NP w )NP )VP )S"
  # Predicted: S and the first NP right, VP spans the wrong words, inner NP missing.
  pred = "(S (NP w w )NP w (VP w )VP )S"
  # gold brackets: S(0,4) NP(0,2) VP(2,4) NP(3,4); predicted: S(0,4) NP(0,2) VP(3,4)
  precision, recall = 2 / 3, 2 / 4
  expected = 100 * 2 * precision * recall / (precision + recall)
  assert metrics.corpus_bracket_f1([pred], [gold]) == pytest.approx(expected)
  assert metrics.exact_match([pred, gold], [gold, gold]) == pytest.approx(50.0)


def test_top_k_accuracy_by_hand():
  logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
  labels = np.array([2, 0, 0])
  assert metrics.top_k_accuracy(logits, labels, 1) == pytest.approx(100 / 3)
  assert metrics.top_k_accuracy(logits, labels, 2) == pytest.approx(200 / 3)
