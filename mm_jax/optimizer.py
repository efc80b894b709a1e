"""Adam with global-norm clipping and a warm-up/decay schedule, all from `config.optimizer`."""

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree


def learning_rate_schedule(opt_config, num_steps: int) -> optax.Schedule:
  """Linear warm-up, then rsqrt (T2T's default), cosine, wsd or constant.

  "wsd" (warm-up, stable, decay) holds the peak and decays linearly to zero over the last
  `cooldown_fraction` of the run: a task that only starts to learn late in a short run (speech,
  once the decoder's attention finds the audio) still gets most of the peak rate, where a cosine
  has already spent it.
  """
  peak = opt_config.learning_rate
  warmup = max(int(opt_config.warmup_steps), 1)
  decay = opt_config.decay

  def schedule(step):
    step = jnp.asarray(step, jnp.float32) + 1.0
    warm = jnp.minimum(step / warmup, 1.0)
    if decay == "rsqrt":
      after = jnp.sqrt(warmup / jnp.maximum(step, warmup))
    elif decay == "cosine":
      progress = jnp.clip((step - warmup) / max(num_steps - warmup, 1), 0.0, 1.0)
      after = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif decay == "wsd":
      cooldown = max(opt_config.cooldown_fraction * num_steps, 1.0)
      after = jnp.clip((num_steps - step) / cooldown, 0.0, 1.0)
    else:  # "constant"; other values are rejected by config validation
      after = 1.0
    return peak * warm * after

  return schedule


def make_optimizer(opt_config, num_steps: int) -> optax.GradientTransformation:
  """With `opt_config.flatten`, the clip and Adam see every parameter as one vector.

  The update is the same elementwise math; what changes is the program. Per leaf, the norm, the
  moments and the update are separate kernels: the default model's 252 leaves made about 600 of
  its step's 3466 fusions. In one vector the step compiled in 10-15 fewer CPU-seconds on 2 cores
  (docs/performance.md). The vector is replicated: it needs every parameter replicated
  (validation.py).
  """
  adam = optax.adamw if opt_config.weight_decay else optax.adam
  kwargs = {"weight_decay": opt_config.weight_decay} if opt_config.weight_decay else {}
  chain = optax.chain(
    optax.clip_by_global_norm(opt_config.grad_clip_norm),
    adam(
      learning_rate_schedule(opt_config, num_steps),
      b1=opt_config.b1,
      b2=opt_config.b2,
      eps=opt_config.eps,
      **kwargs,
    ),
  )
  return optax.flatten(chain) if is_flat(opt_config) else chain


def is_flat(opt_config) -> bool:
  return bool(opt_config.flatten)


def global_norm(grads, flat: bool) -> jax.Array:
  """The gradients' global norm as the clip computes it (`flat`: on one vector), so that XLA
  computes it once."""
  return optax.global_norm(ravel_pytree(grads)[0] if flat else grads)
