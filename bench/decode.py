"""Cached decoding speed: flat per-token cost, cached vs uncached, tokens per second.

  python bench/decode.py [--size=default] [--repeats=3]

Random parameters of the config's model (speed does not depend on training); EOS is made
impossible so every row decodes the full length. Every figure is a ratio within this run, or a
rate measured in it; each time is the best of `repeats` runs after a compile run.
"""

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs import multimodel as multimodel_config  # noqa: E402
from mm_jax import decode, run  # noqa: E402
from mm_jax.models.multimodel import MultiModel, TaskSignature  # noqa: E402

SIGNATURE = TaskSignature("language", "language")


def best_time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def setup(size: str, batch_size: int, input_length: int = 32):
  config = multimodel_config.get_config(size)
  model = MultiModel(run.model_config(config.model, jax.default_backend()))
  rng = np.random.default_rng(0)
  batch = {
    "inputs": jnp.asarray(rng.integers(2, 200, (batch_size, input_length)), jnp.int32),
    "targets": jnp.ones((batch_size, 4), jnp.int32),
    "target_space": jnp.zeros((batch_size,), jnp.int32),
  }
  init = jax.jit(lambda b: model.init(jax.random.key(0), b, SIGNATURE, train=False)["params"])
  params = nn.unbox(init(batch))
  bias = params["language"]["softmax"]["bias"]
  params["language"]["softmax"]["bias"] = bias.at[decode.EOS].set(-1e9)  # never ends early
  return model, params, batch


def steps_at(model, max_length: int, position: int, count: int):
  """Jitted: `count` cached steps, each decoding position `position` (its per-token cost)."""

  def run(params, batch):
    step, cache = decode.make_stepper(model, params, batch, SIGNATURE, max_length, cached=True)
    tokens = jnp.full((batch["target_space"].shape[0], max_length), 5, jnp.int32)

    def body(_, carry):
      cache, total = carry
      logits, cache = step(cache, tokens, jnp.int32(position))
      return cache, total + logits[:, 0].sum()

    return jax.lax.fori_loop(0, count, body, (cache, 0.0))[1]

  return jax.jit(run)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", default="default")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  rows = []

  model, params, batch = setup(args.size, 8)
  # Per-token time at p: (time of 144 steps at p - time of 16 steps at p) / 128, so encoding
  # and cache set-up cancel out.
  per = {}
  for position in (10, 200):
    short = best_time(steps_at(model, 256, position, 16), params, batch, repeats=args.repeats)
    long = best_time(steps_at(model, 256, position, 144), params, batch, repeats=args.repeats)
    per[position] = (long - short) / 128
  per_10, per_200 = per[10], per[200]
  rows.append(("cached per-token time, position 200 / position 10 (batch 8)", per_200 / per_10))

  length = 128
  cached = jax.jit(lambda p, b: decode.greedy(model, p, b, SIGNATURE, length))
  uncached = jax.jit(lambda p, b: decode.greedy_uncached(model, p, b, SIGNATURE, length))
  t_cached = best_time(cached, params, batch, repeats=args.repeats)
  t_uncached = best_time(uncached, params, batch, repeats=args.repeats)
  rows.append((f"cached / uncached greedy, {length} tokens (batch 8)", t_cached / t_uncached))

  rates = []
  for batch_size in (1, 64):
    model, params, batch = setup(args.size, batch_size)
    greedy = jax.jit(lambda p, b, model=model: decode.greedy(model, p, b, SIGNATURE, length))
    seconds = best_time(greedy, params, batch, repeats=args.repeats)
    rates.append((batch_size, batch_size * length / seconds))
  beam = jax.jit(
    lambda p, b: decode.beam_search(model, p, b, SIGNATURE, length, beam_size=4, alpha=0.6)
  )
  t_beam = best_time(beam, params, batch, repeats=args.repeats)

  print(f"decode bench: config {args.size!r}, {jax.devices()[0].platform}, best of {args.repeats}")
  print("| measure | value | goal |")
  print("|---|---|---|")
  goals = ["<= 1.5", "<= 0.2"]
  for (name, value), goal in zip(rows, goals):
    print(f"| {name} | {value:.3f} | {goal} |")
  for batch_size, rate in rates:
    print(f"| cached greedy tokens/s, batch {batch_size} | {rate:,.0f} | |")
  greedy_64 = rates[-1][1]
  beam_rate = 64 * length / t_beam
  print(f"| beam 4 / greedy tokens/s, batch 64 | {beam_rate / greedy_64:.3f} | |")
  print(f"(per-token: {per_10 * 1e3:.2f} ms at position 10, {per_200 * 1e3:.2f} ms at 200)")


if __name__ == "__main__":
  from bench import results

  with results.recorded("decode"):
    main()
