"""Autoregressive decoding of language targets.

`greedy_uncached` recomputes the whole prefix at every position: simple, obviously correct, and
the reference the cached decoder is tested against.
"""

import jax
import jax.numpy as jnp

from mm_jax.models.multimodel import MultiModel

EOS = 1


def greedy_uncached(model, params, batch, signature, max_length: int):
  """Greedy tokens [B, max_length]; positions after EOS are 0 (padding)."""
  encoded, encoded_mask, _ = model.apply(
    {"params": params}, batch, signature, train=False, method=MultiModel.encode
  )
  batch_size = encoded.shape[0]
  positions = jnp.arange(max_length)

  def body(t, tokens):
    logits, _ = model.apply(
      {"params": params},
      encoded,
      encoded_mask,
      tokens,
      batch["target_space"],
      signature,
      train=False,
      method=MultiModel.decode,
    )
    next_token = jnp.argmax(logits[:, t], axis=-1).astype(jnp.int32)
    finished = jnp.any((tokens == EOS) & (positions[None, :] < t), axis=1)
    return tokens.at[:, t].set(jnp.where(finished, 0, next_token))

  tokens = jnp.zeros((batch_size, max_length), jnp.int32)
  return jax.lax.fori_loop(0, max_length, body, tokens)


def strip_after_eos(tokens) -> list[list[int]]:
  """Host-side: each row's ids up to (not including) the first EOS or padding."""
  out = []
  for row in jax.device_get(tokens).tolist():
    ids = []
    for t in row:
      if t in (EOS, 0):
        break
      ids.append(t)
    out.append(ids)
  return out
