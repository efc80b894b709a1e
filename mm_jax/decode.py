"""Autoregressive decoding of language targets: greedy and beam search, cached and uncached.

`greedy_uncached` recomputes the whole prefix at every position: simple, obviously correct, and
the reference the cached decoder is tested against. The cached decoders run `MultiModel.decode_step`
one position at a time: each causal conv keeps its last receptive field, attention keeps the
encoder's keys and values, so a token costs the same at position 200 as at position 10.

Beam search keeps the `beam_size` best hypotheses, finished or not, ranked by log-probability
divided by the GNMT length penalty ((5 + length) / 6) ** alpha; a finished hypothesis stays in the
beam unchanged and the search ends when every hypothesis in it is finished (or at max_length).
With one beam this is exactly greedy decoding. Pad (id 0) is never emitted.

Everything here is a pure function of (params, batch): jit it inside the mesh context and it runs
on the training shardings (the batch axis of every cached state follows the batch).
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from mm_jax.models.multimodel import MultiModel, TaskSignature

EOS = 1
PAD = 0
# The decoder only reads a signature's target modality; the input side is already encoded.
LANGUAGE_TARGETS = TaskSignature("language", "language")


def _no_pad(logits):
  return logits.at[..., PAD].set(-jnp.inf)


def _encode(model, params, batch, signature):
  encoded, encoded_mask, _ = model.apply(
    {"params": params}, batch, signature, train=False, method=MultiModel.encode
  )
  return encoded, encoded_mask


# --------------------------------------------------------------------------------------------
# Step functions: (state, tokens [N, L], t) -> (logits [N, vocab] at position t, state).


def uncached_stepper(model, params, encoded, encoded_mask, target_space):
  """Recomputes the decoder over the whole prefix each step; the state is unused (None)."""

  def step(state, tokens, t):
    logits, _ = model.apply(
      {"params": params},
      encoded,
      encoded_mask,
      tokens,
      target_space,
      LANGUAGE_TARGETS,
      train=False,
      target_mask=jnp.ones(tokens.shape, jnp.float32),
      method=MultiModel.decode,
    )
    return jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False), state

  return step, None


def cached_stepper(model, params, encoded, encoded_mask, target_space, max_length: int):
  """One position per step over the cache; the state is the "cache" collection (conv histories).

  The "memory" collection (the encoder's keys and values) never changes while decoding, so it
  is closed over rather than carried, and beam search never reorders it.
  """
  apply = functools.partial(
    model.apply,
    method=MultiModel.decode_step,
    mutable=["cache", "memory"],
    max_length=max_length,
  )
  first = jnp.zeros(encoded.shape[:1], jnp.int32)
  _, created = apply({"params": params}, encoded, encoded_mask, first, 0, target_space)
  memory = created.get("memory", {})

  def step(cache, tokens, t):
    previous = jax.lax.dynamic_index_in_dim(tokens, jnp.maximum(t - 1, 0), 1, keepdims=False)
    logits, updated = apply(
      {"params": params, "cache": cache, "memory": memory},
      encoded,
      encoded_mask,
      previous,
      t,
      target_space,
    )
    return logits, updated["cache"]

  return step, created.get("cache", {})


def make_stepper(model, params, batch, signature, max_length: int, cached: bool, copies: int = 1):
  """Encodes the batch once and returns (step, state) over `copies` rows per example."""
  encoded, encoded_mask = _encode(model, params, batch, signature)
  target_space = batch["target_space"]
  if copies > 1:
    encoded, encoded_mask, target_space = (
      jnp.repeat(x, copies, axis=0) for x in (encoded, encoded_mask, target_space)
    )
  if cached:
    return cached_stepper(model, params, encoded, encoded_mask, target_space, max_length)
  return uncached_stepper(model, params, encoded, encoded_mask, target_space)


# --------------------------------------------------------------------------------------------
# Greedy.


def greedy_uncached(model, params, batch, signature, max_length: int):
  """Greedy tokens [B, max_length]; positions after EOS are 0 (padding). The reference."""
  step, _ = make_stepper(model, params, batch, signature, max_length, cached=False)
  batch_size = batch["target_space"].shape[0]
  positions = jnp.arange(max_length)

  def body(t, tokens):
    logits, _ = step(None, tokens, t)
    next_token = jnp.argmax(_no_pad(logits), axis=-1).astype(jnp.int32)
    finished = jnp.any((tokens == EOS) & (positions[None, :] < t), axis=1)
    return tokens.at[:, t].set(jnp.where(finished, 0, next_token))

  tokens = jnp.zeros((batch_size, max_length), jnp.int32)
  return jax.lax.fori_loop(0, max_length, body, tokens)


def greedy(model, params, batch, signature, max_length: int, *, cached: bool = True):
  """Greedy tokens [B, max_length] (0 after EOS); stops as soon as every row has ended."""
  step, state = make_stepper(model, params, batch, signature, max_length, cached)
  batch_size = batch["target_space"].shape[0]

  def cond(carry):
    t, _, finished, _ = carry
    return (t < max_length) & ~jnp.all(finished)

  def body(carry):
    t, tokens, finished, state = carry
    logits, state = step(state, tokens, t)
    next_token = jnp.argmax(_no_pad(logits), axis=-1).astype(jnp.int32)
    tokens = tokens.at[:, t].set(jnp.where(finished, 0, next_token))
    return t + 1, tokens, finished | (next_token == EOS), state

  tokens = jnp.zeros((batch_size, max_length), jnp.int32)
  finished = jnp.zeros((batch_size,), bool)
  _, tokens, _, _ = jax.lax.while_loop(cond, body, (0, tokens, finished, state))
  return tokens


# --------------------------------------------------------------------------------------------
# Beam search.


def length_penalty(length, alpha: float):
  """GNMT's ((5 + length) / 6) ** alpha; scores are log-probabilities divided by it."""
  return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def reorder_rows(tree, parent):
  """Gathers each example's beams: leaves [B*K, ...], parent [B, K] -> leaves [B*K, ...]."""
  batch_size, beam_size = parent.shape

  def gather(x):
    x = x.reshape(batch_size, beam_size, *x.shape[1:])
    index = parent.reshape(batch_size, beam_size, *([1] * (x.ndim - 2)))
    return jnp.take_along_axis(x, index, axis=1).reshape(batch_size * beam_size, *x.shape[2:])

  return jax.tree.map(gather, tree)


def beam_search_steps(
  step: Callable,
  state,
  batch_size: int,
  beam_size: int,
  max_length: int,
  alpha: float,
):
  """(tokens [B, K, L] best first, scores [B, K]) from a step function over B*K rows."""
  shape = (batch_size, beam_size)
  log_prob = jnp.where(jnp.arange(beam_size) == 0, 0.0, -jnp.inf) * jnp.ones(shape)
  init = (
    0,
    jnp.zeros((*shape, max_length), jnp.int32),
    log_prob,  # raw log-probability of each hypothesis
    jnp.zeros(shape, bool),  # ended with EOS
    jnp.zeros(shape, jnp.int32),  # length, EOS included
    state,
  )

  def cond(carry):
    t, _, _, finished, _, _ = carry
    return (t < max_length) & ~jnp.all(finished)

  def body(carry):
    t, tokens, log_prob, finished, lengths, state = carry
    logits, state = step(state, tokens.reshape(batch_size * beam_size, max_length), t)
    vocab = logits.shape[-1]
    token_log_prob = jax.nn.log_softmax(_no_pad(logits).astype(jnp.float32), axis=-1)
    token_log_prob = token_log_prob.reshape(*shape, vocab)
    extended = (log_prob[..., None] + token_log_prob) / length_penalty(t + 1, alpha)
    # A finished hypothesis has one candidate: itself, followed by padding, at its own score.
    kept = log_prob / length_penalty(lengths, alpha)
    stay = jnp.where(jnp.arange(vocab) == PAD, kept[..., None], -jnp.inf)
    candidates = jnp.where(finished[..., None], stay, extended).reshape(batch_size, -1)
    _, index = jax.lax.top_k(candidates, beam_size)
    parent, token = index // vocab, (index % vocab).astype(jnp.int32)
    pick = lambda x: jnp.take_along_axis(x, parent, axis=1)
    was_finished = pick(finished)
    token_score = jnp.take_along_axis(token_log_prob.reshape(batch_size, -1), index, axis=1)
    log_prob = pick(log_prob) + jnp.where(was_finished, 0.0, token_score)
    tokens = jnp.take_along_axis(tokens, parent[..., None], axis=1)
    tokens = tokens.at[:, :, t].set(jnp.where(was_finished, PAD, token))
    lengths = jnp.where(was_finished, pick(lengths), t + 1)
    finished = was_finished | (token == EOS)
    return t + 1, tokens, log_prob, finished, lengths, reorder_rows(state, parent)

  _, tokens, log_prob, _, lengths, _ = jax.lax.while_loop(cond, body, init)
  scores = log_prob / length_penalty(lengths, alpha)
  order = jnp.argsort(-scores, axis=1, stable=True)
  tokens = jnp.take_along_axis(tokens, order[..., None], axis=1)
  return tokens, jnp.take_along_axis(scores, order, axis=1)


def beam_search(
  model,
  params,
  batch,
  signature,
  max_length: int,
  *,
  beam_size: int,
  alpha: float,
  cached: bool = True,
):
  """Best hypothesis per example, tokens [B, max_length] (0 after EOS)."""
  step, state = make_stepper(model, params, batch, signature, max_length, cached, beam_size)
  batch_size = batch["target_space"].shape[0]
  tokens, _ = beam_search_steps(step, state, batch_size, beam_size, max_length, alpha)
  return tokens[:, 0]


def decode_tokens(model, params, batch, signature, *, max_length, beam_size=1, alpha=0.6):
  """Cached greedy (beam_size 1; beam search with one beam is the same) or beam search."""
  if beam_size == 1:
    return greedy(model, params, batch, signature, max_length)
  return beam_search(model, params, batch, signature, max_length, beam_size=beam_size, alpha=alpha)


def jit_decoder(model, decode_config, beam_size: int | None = None):
  """A jitted (params, batch, signature) -> tokens with config.decode's settings."""
  fn = functools.partial(
    decode_tokens,
    model,
    max_length=int(decode_config.max_decode_length),
    beam_size=int(decode_config.beam_size if beam_size is None else beam_size),
    alpha=float(decode_config.length_penalty),
  )
  return jax.jit(fn, static_argnames="signature")


def strip_after_eos(tokens) -> list[list[int]]:
  """Host-side: each row's ids up to (not including) the first EOS or padding."""
  out = []
  for row in jax.device_get(tokens).tolist():
    ids = []
    for t in row:
      if t in (EOS, PAD):
        break
      ids.append(t)
    out.append(ids)
  return out
