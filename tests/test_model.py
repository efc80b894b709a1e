"""The MultiModel network: shapes, causality, padding, gradients, sharding, summary."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import short_kernels

from configs.multimodel import get_config
from mm_jax import run, sharding, validation
from mm_jax.models import blocks
from mm_jax.models.multimodel import MultiModel, TaskSignature
from mm_jax.models.summary import summary

B, L_IN, L_OUT, FRAMES, CLASSES = 8, 12, 10, 40, 10

# The tests run tiny models once each: compile time dominates, and LLVM at -O0 halves it.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)

SIGNATURES = {
  "text_to_text": TaskSignature("language", "language"),
  "image_to_class": TaskSignature("image", "categorical", CLASSES),
  "image_to_text": TaskSignature("image", "language"),
  "audio_to_text": TaskSignature("audio", "language"),
  "text_to_class": TaskSignature("language", "categorical", CLASSES),
}


def tiny_model(**overrides):
  config = get_config("tiny").model
  for key, value in overrides.items():
    if key.startswith("moe_"):
      config.moe[key[4:]] = value
    else:
      config[key] = value
  return MultiModel(run.model_config(config, "cpu"))


def token_ids(rng, length, lengths, vocab=256):
  ids = rng.integers(3, vocab, (B, length)).astype(np.int32)
  ids[np.arange(length)[None, :] >= np.asarray(lengths)[:, None]] = 0
  return ids


def make_batches(seed=0, groups=None):
  """One batch per task, with ragged real lengths and garbage in padded audio frames; `groups`
  picks some (every batch is drawn first, so a group's batch does not depend on the choice)."""
  rng = np.random.default_rng(seed)
  text_lengths = [L_IN, 9, 5, 12, 1, 7, 11, 3]
  target_lengths = [L_OUT, 4, 8, 1, 10, 6, 2, 9]
  frame_lengths = np.array([FRAMES, 33, 25, 17, 40, 2, 39, 30])
  frames_mask = (np.arange(FRAMES)[None, :] < frame_lengths[:, None]).astype(np.float32)
  spaces = np.arange(B, dtype=np.int32) % 5
  image = lambda size: rng.uniform(-1, 1, (B, size, size, 3)).astype(np.float32)
  batches = {
    "text_to_text": {
      "inputs": token_ids(rng, L_IN, text_lengths),
      "targets": token_ids(rng, L_OUT, target_lengths),
      "target_space": spaces,
    },
    "image_to_class": {"inputs": image(28), "targets": rng.integers(0, CLASSES, B)},
    "image_to_text": {
      "inputs": image(32),
      "targets": token_ids(rng, L_OUT, target_lengths),
      "target_space": np.zeros(B, np.int32),
    },
    "audio_to_text": {
      "inputs": np.where(frames_mask[..., None] > 0, rng.normal(size=(B, FRAMES, 40)), 1e3).astype(
        np.float32
      ),
      "inputs_mask": frames_mask,
      "targets": token_ids(rng, L_OUT, target_lengths),
      "target_space": np.zeros(B, np.int32),
    },
    "text_to_class": {
      "inputs": token_ids(rng, L_IN, text_lengths),
      "targets": rng.integers(0, CLASSES, B),
    },
  }
  return batches if groups is None else {k: batches[k] for k in groups}


def init_fn(model, batches):
  return lambda rng: model.init(
    {"params": rng}, batches, SIGNATURES, train=False, method=MultiModel.all_tasks
  )


def init(model, batches):
  return jit(init_fn(model, batches))(jax.random.key(0))


@pytest.fixture(scope="module")
def dense():
  model = tiny_model(ffn="dense")
  batches = make_batches()
  return model, init(model, batches), batches


def forward(model, variables, batches):
  apply = lambda v, b: model.apply(v, b, SIGNATURES, train=False, method=MultiModel.all_tasks)
  return jit(apply)(variables, batches)


# Depthwise convolution: both implementations against a float64 NumPy loop.


def depthwise_reference(x, taps, dilation, pads):
  x = np.pad(np.asarray(x, np.float64), ((0, 0), *pads, (0, 0)))
  spatial = [n - lo - hi for n, (lo, hi) in zip(x.shape[1:-1], pads)]
  out = np.zeros((x.shape[0], *spatial, x.shape[-1]))
  for tap in np.ndindex(*taps.shape[:-1]):
    window = tuple(slice(t * r, t * r + n) for t, r, n in zip(tap, dilation, spatial))
    out += x[(slice(None), *window)] * np.asarray(taps, np.float64)[tap]
  return out


@pytest.mark.parametrize("impl", sorted(blocks.DEPTHWISE))
@pytest.mark.parametrize(
  "kernel, dilation, padding",
  [((3,), (1,), "same"), ((15,), (4,), "causal"), ((5,), (2,), "same"), ((3, 3), (1, 1), "same")],
)
def test_depthwise_matches_numpy(impl, kernel, dilation, padding):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, *([20] * len(kernel)), 6)).astype(np.float32)
  taps = rng.normal(size=(*kernel, 6)).astype(np.float32)
  pads = [blocks.conv_padding(k, r, padding) for k, r in zip(kernel, dilation)]
  got = blocks.DEPTHWISE[impl](jnp.asarray(x), jnp.asarray(taps), dilation, pads)
  np.testing.assert_allclose(got, depthwise_reference(x, taps, dilation, pads), atol=1e-4)


@pytest.mark.parametrize(
  "kernel, dilation, padding",
  [((15,), (4,), "causal"), ((4,), (2,), "same"), ((3, 3), (2, 1), "same")],
)
def test_depthwise_shifted_gradient_matches_autodiff_of_grouped(kernel, dilation, padding):
  """The shifted conv's hand-written backward against XLA's own gradient of the grouped conv."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, *([12] * len(kernel)), 4)), jnp.float32)
  taps = jnp.asarray(rng.normal(size=(*kernel, 4)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  pads = [blocks.conv_padding(k, r, padding) for k, r in zip(kernel, dilation)]
  grads = {
    name: jax.grad(lambda x, w, f=f: jnp.vdot(f(x, w, dilation, pads), cot), argnums=(0, 1))(
      x, taps
    )
    for name, f in blocks.DEPTHWISE.items()
  }
  for got, want in zip(grads["shifted"], grads["grouped"]):
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("lead", [(7,), (2, 3, 5)])
def test_dense_dot_gradients_match_numpy(lead):
  """dense_dot's written-out backward against float64 NumPy: grad @ w.T and x.T @ grad."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(*lead, 6))
  w = rng.normal(size=(6, 4))
  cot = rng.normal(size=(*lead, 4))
  f = lambda x, w: jnp.vdot(blocks.dense_dot(x, w), jnp.asarray(cot, jnp.float32))
  dx, dw = jax.grad(f, argnums=(0, 1))(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
  np.testing.assert_allclose(dx, cot @ w.T, rtol=1e-5, atol=1e-5)
  want_dw = x.reshape(-1, 6).T @ cot.reshape(-1, 4)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)


# Shapes: traced with eval_shape, nothing compiled.


@pytest.mark.parametrize(
  "signature, inputs, length",
  [
    (SIGNATURES["image_to_class"], np.zeros((B, 28, 28, 3), np.float32), 2 * 2),  # 28>14>7>4>2
    (SIGNATURES["image_to_class"], np.zeros((B, 64, 64, 3), np.float32), 4 * 4),  # 64>32>...>4
    (SIGNATURES["audio_to_text"], np.zeros((B, 40, 40), np.float32), 10),  # 40>20>10
    (SIGNATURES["audio_to_text"], np.zeros((B, 41, 40), np.float32), 11),  # 41>21>11
    (SIGNATURES["text_to_text"], np.ones((B, 13), np.int32), 13),
  ],
)
def test_modality_net_shapes(dense, signature, inputs, length):
  model, variables, _ = dense
  assert embedded_shapes(model, variables, signature, inputs) == ((B, length, 32), (B, length))


@pytest.mark.parametrize("frames, length", [(40, 5), (41, 6)])  # 40>20>10>5, 41>21>11>6
def test_audio_stem_stride_shortens_the_sequence(dense, frames, length):
  _, variables, _ = dense  # a stride changes no parameter
  model = tiny_model(ffn="dense", audio_stem_stride=2)
  inputs = np.zeros((B, frames, 40), np.float32)
  got = embedded_shapes(model, variables, SIGNATURES["audio_to_text"], inputs)
  assert got == ((B, length, 32), (B, length))


def embedded_shapes(model, variables, signature, inputs):
  """(embedded inputs, their mask) shapes of a batch of `inputs`, traced only."""
  batch = {"inputs": inputs, "inputs_mask": np.ones(inputs.shape[:2], np.float32)}
  x, mask = jax.eval_shape(
    lambda v: model.apply(v, batch, signature, method=MultiModel.embed_inputs), variables
  )
  return x.shape, mask.shape


def test_top_logits_shapes(dense):
  model, variables, batches = dense
  out = jax.eval_shape(
    lambda v: model.apply(v, batches, SIGNATURES, train=False, method=MultiModel.all_tasks),
    variables,
  )
  for name, (logits, aux) in out.items():
    want = (B, CLASSES) if SIGNATURES[name].target_modality == "categorical" else (B, L_OUT, 256)
    assert logits.shape == want and logits.dtype == jnp.float32, name
    assert aux.shape == () and aux.dtype == jnp.float32, name


# Causality and padding.


def causality_case(model, variables, seed):
  """Row 0 is the original; row i changes target token t_i. Returns (logits, positions)."""
  rng = np.random.default_rng(seed)
  positions = [None, 0, 1, 2, 4, 6, 8, 9]
  targets = np.tile(rng.integers(3, 256, (1, L_OUT)), (B, 1)).astype(np.int32)
  for row, t in enumerate(positions[1:], start=1):
    targets[row, t] = 3 + (targets[row, t] - 3 + 1 + row) % 253
  batch = {
    "inputs": np.tile(rng.integers(3, 256, (1, L_IN)), (B, 1)).astype(np.int32),
    "targets": targets,
    "target_space": np.full(B, 1, np.int32),
  }
  sig = SIGNATURES["text_to_text"]
  logits = jit(lambda v: model.apply(v, batch, sig, train=False)[0])(variables)
  return np.asarray(logits), positions


def check_causal(logits, positions):
  for row, t in enumerate(positions[1:], start=1):
    # Position p predicts target p from targets < p: token t reaches positions > t only.
    np.testing.assert_allclose(logits[row, : t + 1], logits[0, : t + 1], atol=1e-5)
    if t + 1 < L_OUT:
      assert np.abs(logits[row, t + 1] - logits[0, t + 1]).max() > 1e-4, (row, t)


def test_causal_dense(dense):
  model, variables, _ = dense
  check_causal(*causality_case(model, variables, seed=2))


@pytest.mark.parametrize("audio_stem_stride", [1, 2])
def test_padding_never_changes_real_positions(audio_stem_stride):
  # With the MoE, whose routing groups padding changes (a dense FFN is per position, so the MoE
  # case covers it); capacity for every token, so no group can drop any.
  model = tiny_model(ffn="moe", moe_capacity_factor_eval=4.0, audio_stem_stride=audio_stem_stride)
  batches = make_batches()
  variables = init(model, batches)
  pad = lambda x, n, value=0: np.concatenate(
    [x, np.full((x.shape[0], n, *x.shape[2:]), value, x.dtype)], axis=1
  )
  padded = {
    "text_to_text": {
      **batches["text_to_text"],
      "inputs": pad(batches["text_to_text"]["inputs"], 5),
      "targets": pad(batches["text_to_text"]["targets"], 3),
    },
    "audio_to_text": {
      **batches["audio_to_text"],
      "inputs": pad(batches["audio_to_text"]["inputs"], 9, 7.0),
      "inputs_mask": pad(batches["audio_to_text"]["inputs_mask"], 9),
    },
    "text_to_class": {
      **batches["text_to_class"],
      "inputs": pad(batches["text_to_class"]["inputs"], 7),
    },
  }
  base = forward(model, variables, {k: batches[k] for k in padded})
  more = forward(model, variables, padded)
  for name in padded:
    got, want = np.asarray(more[name][0]), np.asarray(base[name][0])
    if got.ndim == 3:  # Compare real target positions only.
      real = batches[name]["targets"] != 0
      got, want = got[:, :L_OUT][real], want[real]
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=name)


def test_padding_test_detects_a_leak(dense):
  """Garbage in padded audio frames must matter once the mask is dropped (the test can fail)."""
  model, variables, batches = dense
  batch = dict(batches["audio_to_text"])
  unmasked = {**batch, "inputs_mask": np.ones_like(batch["inputs_mask"])}
  sig = SIGNATURES["audio_to_text"]
  run = jit(lambda b: model.apply(variables, b, sig, train=False)[0])
  assert np.abs(np.asarray(run(unmasked)) - np.asarray(run(batch)))[1].max() > 1e-3


# Gradients.


# Together these tasks use every modality net and the whole body.
ONE_TASK_PER_NET = ("text_to_text", "image_to_class", "audio_to_text")


def task_losses(model, variables, batches, rngs):
  """Through the packed pass the trainer takes (test_packing.py checks it against each group's
  own): one body to compile instead of one per group."""
  logits, aux = model.apply(
    variables, batches, SIGNATURES, train=True, rngs=rngs, method=MultiModel.packed
  )
  total = aux
  for name, task_logits in logits.items():
    targets = batches[name]["targets"]
    logp = jax.nn.log_softmax(task_logits)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    weights = (targets != 0) if task_logits.ndim == 3 else jnp.ones_like(picked)
    total = total - (picked * weights).sum() / weights.sum()
  return total


def test_gradients_reach_every_parameter():
  # Shorter kernels than tiny's and no dropout: reach depends on neither (dropout has no
  # parameters), and the backward compiles in a fifth less time without the dropout masks.
  model = tiny_model(ffn="moe", **short_kernels.model_overrides())
  batches = make_batches(seed=3, groups=ONE_TASK_PER_NET)
  variables = init(model, batches)
  rngs = {"dropout": jax.random.key(1), "gating": jax.random.key(2)}
  grads = jit(jax.grad(lambda v: task_losses(model, v, batches, rngs)))(variables)
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(grads["params"]))[0]
  dead = []
  for path, grad in flat:
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(grad)), name
    if not np.any(grad != 0):
      dead.append(name)
  # The MoE's gate and noise weights start at zero (Shazeer et al.), so may get zero gradient.
  assert [n for n in dead if not n.endswith(("['gate']", "['noise']"))] == []
  assert len(flat) > 150


# Sharded == unsharded.


def packed_logits(model, variables, batches):
  """{group: logits} of the packed pass the trainer takes: one body to compile, not one a group."""
  return model.apply(variables, batches, SIGNATURES, train=False, method=MultiModel.packed)[0]


@pytest.fixture(scope="module")
def unsharded():
  model = tiny_model(ffn="dense", num_heads=4)
  batches = make_batches(seed=4, groups=ONE_TASK_PER_NET)
  variables = init(model, batches)
  return model, variables, batches, jit(functools.partial(packed_logits, model))(variables, batches)


@pytest.mark.parametrize("mesh_config", [{"data": 2, "model": 4}, {"data": 8}])
def test_sharded_matches_unsharded(devices, unsharded, mesh_config):
  model, variables, batches, want = unsharded
  mesh = sharding.make_mesh({"data": 1, "expert": 1, "model": 1, **mesh_config}, devices)
  rules = sharding.logical_rules()
  specs = nn.get_partition_spec(variables)
  param_shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  batch_shardings = jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim), batches)
  sharded_vars = jax.device_put(variables, param_shardings)
  if mesh_config.get("model", 1) > 1:
    kernel = sharded_vars["params"]["decoder"]["after_0"]["convs"]["group0_step0"]["conv"]
    assert not kernel["pointwise"]["kernel"].value.sharding.is_fully_replicated
  apply = functools.partial(packed_logits, model)
  with sharding.activate(mesh, rules):
    got = jit(apply, in_shardings=(param_shardings, batch_shardings))(sharded_vars, batches)
  for name in batches:
    np.testing.assert_allclose(got[name], want[name], atol=2e-5, rtol=2e-5, err_msg=name)


def test_no_parameter_has_an_activation_only_axis():
  """config.optimizer.flatten (one replicated optimizer vector) is allowed where only these logical
  axes are split (validation.py): no parameter may carry one."""
  model = tiny_model()
  variables = jax.eval_shape(init_fn(model, make_batches(seed=0)), jax.random.key(0))
  specs = jax.tree.leaves(nn.get_partition_spec(variables["params"]), is_leaf=_is_spec)
  names = {name for spec in specs for name in spec if name}
  assert {"embed", "expert", "mlp", "vocab"} <= names, names  # the walk reached the parameters
  assert not names & set(validation.ACTIVATION_ONLY_AXES)


def _is_spec(x):
  return isinstance(x, jax.sharding.PartitionSpec)


# The summary command.


@pytest.mark.parametrize("size", ["tiny", "default", "paper"])
def test_summary_counts_parameters(size):
  config = get_config(size)
  text = summary(config)
  d, vocab = config.model.d, config.model.vocab_size
  assert f"d={d} " in text
  # The language net alone: embedding + softmax kernel + softmax bias.
  language = [line for line in text.splitlines() if line.strip().startswith("language ")][0]
  assert int(language.split()[-1].replace(",", "")) == 2 * vocab * d + vocab
