"""Packed task groups (mm_jax/models/packing.py): one body pass equals one pass per group."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import short_kernels
from flax.traverse_util import flatten_dict
from test_model import (
  ONE_TASK_PER_NET,
  SIGNATURES,
  depthwise_reference,
  init,
  jit,
  make_batches,
  packed_logits,
  tiny_model,
)

from configs.multimodel import get_config
from mm_jax import optimizer, run, sharding
from mm_jax import step as step_lib
from mm_jax.data import layout
from mm_jax.models import blocks
from mm_jax.models.multimodel import MultiModel
from mm_jax.models.packing import Packing


def test_pack_unpack_and_tap_masks_by_hand():
  packing = Packing.of([(4, 3), (2, 5)], rows=2)  # a row: two sequences of 3, then one of 5
  assert packing.segments == ((2, 3), (1, 5)) and packing.tokens == 11
  a = np.arange(12).reshape(4, 3)
  b = 100 + np.arange(10).reshape(2, 5)
  packed = np.asarray(packing.pack([jnp.asarray(a), jnp.asarray(b)]))
  np.testing.assert_array_equal(packed[0], [0, 1, 2, 3, 4, 5, 100, 101, 102, 103, 104])
  np.testing.assert_array_equal(packed[1], [6, 7, 8, 9, 10, 11, 105, 106, 107, 108, 109])
  back = packing.unpack(jnp.asarray(packed))
  np.testing.assert_array_equal(back[0], a)
  np.testing.assert_array_equal(back[1], b)
  # A tap one to the left reads the previous sequence at each sequence's first position.
  np.testing.assert_array_equal(packing.tap_valid(-1), [0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(packing.tap_valid(2), [1, 0, 0, 1, 0, 0, 1, 1, 1, 0, 0])
  assert packing.tap_valid(0) is None
  with pytest.raises(ValueError, match="batch of 3 does not split into 2 rows"):
    Packing.of([(3, 2)], rows=2)


@pytest.mark.parametrize(
  "kernel, dilation, padding", [((3,), (1,), "same"), ((15,), (4,), "causal"), ((4,), (2,), "same")]
)
def test_packed_depthwise_equals_each_sequence_alone(kernel, dilation, padding):
  """Forward against float64 NumPy per sequence; backward against autodiff of the unpacked conv."""
  rng = np.random.default_rng(3)
  groups = [rng.normal(size=(4, 7, 3)), rng.normal(size=(2, 12, 3)), rng.normal(size=(6, 2, 3))]
  groups = [jnp.asarray(g, jnp.float32) for g in groups]
  taps = jnp.asarray(rng.normal(size=(*kernel, 3)), jnp.float32)
  pads = [blocks.conv_padding(k, r, padding) for k, r in zip(kernel, dilation)]
  packing = Packing.of([g.shape[:2] for g in groups], rows=2)

  packed_conv = lambda x, w: blocks.depthwise_shifted(x, w, dilation, pads, packing)
  got = packing.unpack(packed_conv(packing.pack(groups), taps))
  for g, out in zip(groups, got):
    np.testing.assert_allclose(out, depthwise_reference(g, taps, dilation, pads), atol=1e-4)

  cotangents = [jnp.asarray(rng.normal(size=g.shape), jnp.float32) for g in groups]
  packed_loss = lambda xs, w: jnp.sum(packing.pack(cotangents) * packed_conv(packing.pack(xs), w))
  each_loss = lambda xs, w: sum(
    jnp.sum(c * blocks.depthwise_grouped(x, w, dilation, pads)) for x, c in zip(xs, cotangents)
  )
  (got_dx, got_dw), (want_dx, want_dw) = (
    jax.grad(f, argnums=(0, 1))(groups, taps) for f in (packed_loss, each_loss)
  )
  for got_g, want_g in zip(got_dx, want_dx):
    np.testing.assert_allclose(got_g, want_g, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(got_dw, want_dw, atol=1e-3, rtol=1e-4)


# The model-level tests run kernel 3 (with dilation 4) in place of 15: every conv still reads
# across sequence boundaries; the depthwise tests above check the kernel-15 taps themselves.
SHORT = short_kernels.model_overrides()


def per_group(model, variables, batches):
  apply = lambda v, b: model.apply(v, b, SIGNATURES, train=False, method=MultiModel.all_tasks)
  return {name: logits for name, (logits, _) in jit(apply)(variables, batches).items()}


def packed(model, variables, batches):
  return jit(functools.partial(packed_logits, model))(variables, batches)


@pytest.mark.parametrize(
  "overrides, groups",
  [
    ({"ffn": "dense"}, tuple(SIGNATURES)),
    ({"ffn": "moe"}, ONE_TASK_PER_NET),
    ({"ffn": "dense", "use_attention": False}, ONE_TASK_PER_NET),
  ],
  ids=["dense", "moe", "no_attention"],
)
def test_packed_logits_equal_per_group(overrides, groups):
  """Ragged lengths, padded audio frames full of garbage, every kind of group at once (the
  dense case; the others, one group per modality net: the unpacked reference compiles the body
  once per group)."""
  model = tiny_model(**SHORT, **overrides)
  batches = make_batches(seed=5, groups=groups)
  variables = init(model, batches)
  want, got = per_group(model, variables, batches), packed(model, variables, batches)
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], atol=2e-5, rtol=2e-5, err_msg=name)


def test_packed_gradients_equal_per_group():
  model = tiny_model(ffn="dense", **SHORT)
  # One group per modality net (every parameter), not all five: the unpacked reference runs the
  # body once per group, and its backward is the longest compile of this file.
  batches = make_batches(seed=6, groups=ONE_TASK_PER_NET)
  params = init(model, batches)["params"]
  weights = {name: jax.random.normal(jax.random.key(i), (8,)) for i, name in enumerate(batches)}

  def loss(logits):  # every example's logits weighted differently: no gradient can cancel
    return sum(jnp.sum(weights[n][:, None] * logits[n].reshape(8, -1)) for n in logits)

  def per_group_loss(p):
    out = model.apply({"params": p}, batches, SIGNATURES, train=False, method=MultiModel.all_tasks)
    return loss({n: logits for n, (logits, _) in out.items()})

  def packed_loss(p):
    return loss(model.apply({"params": p}, batches, SIGNATURES, train=False, method="packed")[0])

  want, got = (jit(jax.grad(f))(params) for f in (per_group_loss, packed_loss))
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    w, g = nn.unbox(w), nn.unbox(g)
    np.testing.assert_allclose(
      g, w, atol=1e-5 * float(jnp.max(jnp.abs(w))) + 1e-7, err_msg=str(path)
    )


def test_packed_sharded_matches_unsharded(devices):
  """On a (data=8) mesh each device packs its own shard's examples (one row each)."""
  model = tiny_model(ffn="dense", **SHORT)
  batches = make_batches(seed=7)
  variables = init(model, batches)
  want = packed(model, variables, batches)
  mesh = sharding.make_mesh({"data": 8, "expert": 1, "model": 1}, devices)
  rules = sharding.logical_rules()
  batch_shardings = jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim), batches)
  apply = functools.partial(packed_logits, model)
  with sharding.activate(mesh, rules):
    got = jit(apply, in_shardings=(None, batch_shardings))(variables, batches)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], atol=2e-5, rtol=2e-5, err_msg=name)


def test_one_packed_init_equals_each_group_initialised_alone(devices):
  """step_lib.init_state builds every param in one packed pass; per-group init, merged, is the
  reference (a param's value depends on its path only). No data is read: shapes from the config."""
  config = short_kernels.apply(get_config("tiny"))
  tasks = layout.build_tasks(config)
  plan, specs = step_lib.step_batch_specs(config, tasks, dict.fromkeys(tasks, 2))
  assert len(plan) == 4, [g.name for g in plan]  # every modality net and the decoder
  model = MultiModel(run.model_config(config.model, "cpu"))
  tx = optimizer.make_optimizer(config.optimizer, config.train.num_steps)
  init = functools.partial(step_lib.init_state, model=model, tx=tx, plan=plan)
  mesh = sharding.make_mesh({"data": 1, "expert": 1, "model": 1}, devices[:1])
  rules = sharding.config_rules(config)
  _, _, jit_init = step_lib.traced_init(init, specs, mesh, rules)
  with sharding.activate(mesh, rules):
    got = jit_init(jax.random.key(5)).params

  def group_init(rng, group):
    zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in specs[group.name].items()}
    del zeros["task_index"]
    return nn.unbox(model.init(rng, zeros, group.signature, train=False)["params"])

  want = {}
  group_init = jax.jit(group_init, static_argnums=1)
  for group in plan:
    for path, value in flatten_dict(group_init(jax.random.key(5), group)).items():
      if path in want:  # the shared body: the same value from every group
        np.testing.assert_array_equal(value, want[path], err_msg=str(path))
      want[path] = value
  got = flatten_dict(got)
  assert sorted(got) == sorted(want)
  for path, value in want.items():
    np.testing.assert_array_equal(got[path], value, err_msg=str(path))


def test_rbg_init_is_the_same_on_any_mesh(devices):
  """config.train.init_prng_impl="rbg": every device draws each whole array and keeps its shard,
  so a sharded init equals the one-device init (threefry's is covered by test_train.py's runs)."""
  config = short_kernels.apply(get_config("tiny,tasks=translate_en_de"))
  config.train.init_prng_impl = "rbg"
  tasks = layout.build_tasks(config)
  plan, specs = step_lib.step_batch_specs(config, tasks, dict.fromkeys(tasks, 8))
  model = MultiModel(run.model_config(config.model, "cpu"))
  tx = optimizer.make_optimizer(config.optimizer, config.train.num_steps)
  init = functools.partial(step_lib.init_state, model=model, tx=tx, plan=plan)
  rules = sharding.config_rules(config)
  params = []
  one_device, split = {"data": 1, "expert": 1, "model": 1}, {"data": 2, "expert": 2, "model": 2}
  for shape, devs in ((one_device, devices[:1]), (split, devices)):
    mesh = sharding.make_mesh(shape, devs)
    _, shardings, jit_init = step_lib.traced_init(init, specs, mesh, rules, "rbg")
    with sharding.activate(mesh, rules):
      params.append(flatten_dict(jit_init(step_lib.init_key(config)).params))
  assert any(
    len(s.device_set) > 1 and not s.is_fully_replicated for s in jax.tree.leaves(shardings)
  )
  for path, value in params[0].items():
    np.testing.assert_array_equal(np.asarray(params[1][path]), np.asarray(value), err_msg=str(path))
