"""MoE layer against a float64 NumPy reference, across meshes, and in compiled HLO."""

import math
import re

import flax.linen as nn
import jax
import jax.experimental.mesh_utils  # noqa: F401  (sharding.make_mesh uses it)
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from scipy.stats import norm

from mm_jax import expert_load, sharding
from mm_jax.errors import ConfigError
from mm_jax.models import moe as moe_lib
from mm_jax.models.moe import MoE, validate_moe_config

D, HIDDEN = 8, 16

GOOD = dict(
  num_experts=8,
  k=2,
  hidden=16,
  capacity_factor_train=1.25,
  capacity_factor_eval=2.0,
  group_size=64,
  noisy_gating=True,
  balance_loss="cv",
  balance_coef=0.01,
  z_loss_coef=0.0,
  dispatch="capacity",
)


def make_layer(**overrides):
  """Small, noise-free layer for exact comparisons."""
  small = dict(hidden=HIDDEN, capacity_factor_train=1.0, capacity_factor_eval=1.0, group_size=16)
  return MoE(**{**GOOD, **small, "noisy_gating": False, "z_loss_coef": 0.001, **overrides})


def random_params(layer, x, seed):
  """Random values for every parameter (the gate is zero at init, which routes nothing useful)."""
  params = nn.unbox(jax.eval_shape(layer.init, jax.random.key(0), x, None)["params"])
  keys = jax.random.split(jax.random.key(seed), len(params))
  scales = {"gate": 1.0, "noise": 0.3, "w_in": 0.5, "w_out": 0.5}
  return {
    name: scales[name] * jax.random.normal(key, value.shape, jnp.float32)
    for key, (name, value) in zip(keys, sorted(params.items()))
  }


def random_inputs(batch, length, seed, pad=True):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, length, D)).astype(np.float32)
  mask = np.ones((batch, length), np.float32)
  if pad:  # a ragged tail of padding on every other row
    for b in range(0, batch, 2):
      mask[b, length - 1 - b % length :] = 0
  return x, mask


# ----------------------------------------------------------------------------------------------
# The reference: a direct, loop-by-loop float64 reading of the algorithm.


def reference_moe(x, mask, params, *, num_experts, k, group_size, capacity_factor, balance_loss):
  x = np.asarray(x, np.float64).reshape(-1, D)
  mask = np.asarray(mask, np.float64).reshape(-1)
  w_gate, w_in, w_out = (np.asarray(params[n], np.float64) for n in ("gate", "w_in", "w_out"))
  logits = x @ w_gate
  tokens = x.shape[0]
  top = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
  top_logits = np.take_along_axis(logits, top, axis=-1)
  gates = np.exp(top_logits - top_logits.max(-1, keepdims=True))
  gates /= gates.sum(-1, keepdims=True)
  capacity = max(1, math.ceil(capacity_factor * group_size * k / num_experts))

  y = np.zeros_like(x)
  kept = dropped = 0
  kept_choice = np.zeros((tokens, k))  # the routing decisions: 1 where (token, choice) got a slot
  for start in range(0, tokens, group_size):
    filled = np.zeros(num_experts, int)
    for choice in range(k):  # all first choices of the group before any second choice
      for t in range(start, start + group_size):
        if mask[t] == 0:
          continue
        e = top[t, choice]
        if filled[e] >= capacity:
          dropped += 1
          continue
        filled[e] += 1
        kept += 1
        kept_choice[t, choice] = 1
        expert_out = np.maximum(x[t] @ w_in[e], 0) @ w_out[e]
        y[t] += gates[t, choice] * expert_out

  real = mask.sum()
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  importance, load = np.zeros(num_experts), np.zeros(num_experts)
  for t in range(tokens):
    for choice in range(k):
      importance[top[t, choice]] += mask[t] * gates[t, choice]
      load[top[t, choice]] += mask[t]

  def cv2(v):
    return v.var() / (v.mean() ** 2 + 1e-10) if len(v) > 1 else 0.0

  if balance_loss == "cv":
    balance = cv2(importance) + cv2(load)
  else:
    balance = num_experts * np.sum(load / (k * real) * (probs * mask[:, None]).sum(0) / real)
  lse = np.log(np.exp(logits).sum(-1))
  z_loss = np.sum(mask * lse**2) / real
  entropy = -np.sum(probs * np.log(probs), -1)
  return {
    "y": y,
    "balance": balance,
    "z_loss": z_loss,
    "fraction_dropped": dropped / (kept + dropped),
    "expert_load": load / (k * real),
    "decisions": (top, gates, probs, kept_choice),
    "router_entropy": np.sum(mask * entropy) / real,
    "router_confidence": np.sum(mask * probs.max(-1)) / real,
  }


@pytest.mark.parametrize(
  "num_experts,k,capacity_factor,balance_loss,train",
  [
    (4, 2, 1.0, "cv", False),
    (8, 1, 0.5, "switch", True),  # drops many tokens
    (8, 2, 0.75, "cv", True),
    (3, 3, 2.0, "switch", False),  # k == E, never drops
  ],
)
def test_matches_float64_reference(num_experts, k, capacity_factor, balance_loss, train):
  layer = make_layer(
    num_experts=num_experts,
    k=k,
    # The factor of the other mode is wrong on purpose: the layer must pick by `train`.
    capacity_factor_train=capacity_factor if train else 0.1,
    capacity_factor_eval=0.1 if train else capacity_factor,
    balance_loss=balance_loss,
  )
  x, mask = random_inputs(4, 16, seed=num_experts * 10 + k)
  params = random_params(layer, x, seed=k)
  apply = jax.jit(lambda p: layer.apply({"params": p}, x, mask, train=train, mutable=True))
  (y, aux), state = apply(params)
  sown = {name: value[0] for name, value in state["intermediates"].items()}
  ref = reference_moe(
    x,
    mask,
    params,
    num_experts=num_experts,
    k=k,
    group_size=16,
    capacity_factor=capacity_factor,
    balance_loss=balance_loss,
  )
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), ref["y"], rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(aux, 0.01 * ref["balance"] + 0.001 * ref["z_loss"], rtol=1e-4)
  for name in ("fraction_dropped", "expert_load", "router_entropy", "router_confidence"):
    np.testing.assert_allclose(sown[name], ref[name], rtol=1e-4, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(sown["z_loss"], ref["z_loss"], rtol=1e-4)
  if capacity_factor < 1.0:
    assert ref["fraction_dropped"] > 0.1  # the case really exercises dropping


@pytest.mark.parametrize("balance_loss", ["cv", "switch"])
def test_per_task_routing_matches_float64_counts_of_the_decisions(balance_loss):
  """Tokens of three tasks, some padded, a capacity that drops: each task's expert shares,
  dropped share and balance loss against a float64 count of the reference's routing decisions."""
  num_experts, k, num_tasks = 8, 2, 3
  layer = make_layer(num_experts=num_experts, k=k, capacity_factor_train=0.75)
  layer = layer.clone(balance_loss=balance_loss)
  x, mask = random_inputs(4, 16, seed=11)
  params = random_params(layer, x, seed=4)
  task_of = np.random.default_rng(2).integers(0, num_tasks, size=mask.shape)
  tasks = np.eye(num_tasks, dtype=np.float32)[task_of]
  apply = lambda p: layer.apply({"params": p}, x, mask, train=True, tasks=tasks, mutable=True)
  _, state = jax.jit(apply)(params)
  (sums,) = state["intermediates"]["task_routing"]
  names = {f"task{i}": i for i in range(num_tasks)}
  scalars = expert_load.metrics({"layer": sums}, {"layer": names}, k, balance_loss)
  ref = reference_moe(
    x,
    mask,
    params,
    num_experts=num_experts,
    k=k,
    group_size=16,
    capacity_factor=0.75,
    balance_loss=balance_loss,
  )
  top, gates, probs, kept_choice = ref["decisions"]
  real = mask.reshape(-1) > 0
  for name, i in names.items():
    mine = real & (task_of.reshape(-1) == i)
    assigned, importance = np.zeros(num_experts), np.zeros(num_experts)
    for t in np.flatnonzero(mine):
      for choice in range(k):
        assigned[top[t, choice]] += 1
        importance[top[t, choice]] += gates[t, choice]
    shares = [scalars[f"moe/layer/{name}/expert_{e}"] for e in range(num_experts)]
    np.testing.assert_allclose(shares, assigned / assigned.sum(), rtol=1e-6, atol=1e-7)
    dropped = 1 - kept_choice[mine].sum() / (k * mine.sum())
    np.testing.assert_allclose(scalars[f"moe/layer/{name}/dropped"], dropped, atol=1e-6)
    if balance_loss == "cv":
      cv2 = lambda v: v.var() / v.mean() ** 2
      balance = cv2(importance) + cv2(assigned)
    else:
      n = mine.sum()
      balance = num_experts * np.sum(assigned / (k * n) * probs[mine].sum(0) / n)
    np.testing.assert_allclose(scalars[f"moe/layer/{name}/balance_loss"], balance, rtol=1e-4)
  assert ref["fraction_dropped"] > 0.1  # the capacity really drops


def test_prob_in_top_k_matches_normal_cdf_reference():
  rng = np.random.default_rng(3)
  clean = rng.normal(size=(50, 6))
  std = 0.1 + rng.random((50, 6))
  noisy = clean + std * rng.normal(size=(50, 6))
  k = 2
  expected = np.zeros_like(clean)
  for t in range(50):
    for e in range(6):
      others = np.delete(noisy[t], e)  # expert e is in the top k iff it beats the k-th of the rest
      threshold = np.sort(others)[::-1][k - 1]
      expected[t, e] = norm.cdf((clean[t, e] - threshold) / std[t, e])
  got = moe_lib.prob_in_top_k(
    jnp.asarray(clean, jnp.float32), jnp.asarray(noisy, jnp.float32), jnp.asarray(std), k
  )
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_noise_only_in_training_and_padding_not_routed():
  layer = make_layer(noisy_gating=True, capacity_factor_eval=4.0, capacity_factor_train=4.0)
  x, mask = random_inputs(4, 16, seed=1)
  params = random_params(layer, x, seed=5)
  apply = jax.jit(
    lambda train, seed: layer.apply(
      {"params": params}, x, mask, train=train, rngs={"gating": jax.random.key(seed)}
    ),
    static_argnums=0,
  )
  y_eval_a, _ = apply(False, 0)
  y_eval_b, _ = apply(False, 1)
  np.testing.assert_array_equal(y_eval_a, y_eval_b)
  y_train_a, _ = apply(True, 0)
  y_train_b, _ = apply(True, 1)
  assert np.abs(np.asarray(y_train_a) - np.asarray(y_train_b)).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(y_train_a)[mask == 0], 0.0)
  # Changing a padded token's contents changes nothing, including the balance loss.
  x2 = np.where(mask[..., None] == 0, 100.0, x).astype(np.float32)
  apply_eval = jax.jit(lambda x: layer.apply({"params": params}, x, mask, train=False))
  (y1, aux1), (y2, aux2) = apply_eval(x), apply_eval(x2)
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_allclose(aux1, aux2, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Dropless == capacity when nothing is dropped.


def test_dropless_equals_capacity_when_nothing_dropped():
  x, mask = random_inputs(4, 16, seed=7)
  capacity = make_layer(num_experts=8, capacity_factor_eval=4.0)  # capacity = a whole group
  dropless = make_layer(num_experts=8, dispatch="dropless")
  params = random_params(capacity, x, seed=2)

  def loss(layer, params, x):
    y, aux = layer.apply({"params": params}, x, mask, train=False)
    return jnp.sum(jnp.sin(y)) + aux

  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(1, 2)), static_argnums=0)
  results = [grad_fn(layer, params, x) for layer in (capacity, dropless)]
  (value_c, grads_c), (value_d, grads_d) = results
  np.testing.assert_allclose(value_c, value_d, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads_c, grads_d
  )


# ----------------------------------------------------------------------------------------------
# Sharded == unsharded, and the collectives the partitioner emits.

MESHES = {
  "data2_expert4": {"data": 2, "expert": 4, "model": 1},
  "expert8": {"data": 1, "expert": 8, "model": 1},
  "one_device": {"data": 1, "expert": 1, "model": 1},
}
# Rule sets by name: the default (experts over `expert`, replicated over `data`) and GShard's
# layout with experts over every device (config.mesh_rules.expert=data,expert).
RULES = {
  "experts_on_expert_axis": sharding.logical_rules(),
  "experts_on_all_devices": sharding.logical_rules({"expert": "data,expert"}),
}


def mesh_for(name, devices):
  shape = MESHES[name]
  return sharding.make_mesh(shape, devices[: math.prod(shape.values())])


def shardings_of(layer, x, mask, mesh):
  boxed = jax.eval_shape(layer.init, jax.random.key(0), x, mask)["params"]
  return nn.unbox(nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh))


def loss_and_grads(layer, params, x, mask, mesh, rules=RULES["experts_on_expert_axis"]):
  """value_and_grad of a loss that uses the output, jitted with in/out shardings from the rules."""

  def loss(params, x):
    y, aux = layer.apply({"params": params}, x, mask, train=False)
    return jnp.sum(jnp.sin(y) * jnp.arange(D)) + aux

  if mesh is None:
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
  with sharding.activate(mesh, rules):
    param_shardings = shardings_of(layer, x, mask, mesh)
    x_sharding = sharding.batch_sharding(mesh, 3)
    step = jax.jit(
      jax.value_and_grad(loss, argnums=(0, 1)),
      in_shardings=(param_shardings, x_sharding),
      out_shardings=(sharding.replicated(mesh), (param_shardings, x_sharding)),
    )
    return step(params, x)


@pytest.mark.parametrize("rules", list(RULES))
@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_sharded_equals_unsharded(devices, dispatch, rules):
  layer = make_layer(num_experts=8, dispatch=dispatch, capacity_factor_eval=0.75)
  x, mask = random_inputs(16, 8, seed=11)
  params = random_params(layer, x, seed=3)
  want_value, want_grads = loss_and_grads(layer, params, x, mask, None)
  for name in MESHES:
    mesh = mesh_for(name, devices)
    value, grads = loss_and_grads(layer, params, x, mask, mesh, rules=RULES[rules])
    np.testing.assert_allclose(value, want_value, rtol=1e-5, err_msg=name)
    jax.tree.map(
      lambda a, b, name=name: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name),
      grads,
      want_grads,
    )


def collective_lines(hlo_text, op):
  return [line for line in hlo_text.splitlines() if re.search(rf"\b{op}(-start)?\(", line)]


@pytest.mark.parametrize("rules", list(RULES))
@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_train_step_hlo_has_all_to_all_and_keeps_experts_in_place(devices, dispatch, rules):
  layer = make_layer(num_experts=8, hidden=32, dispatch=dispatch)
  x, mask = random_inputs(16, 8, seed=2)
  mesh = mesh_for("data2_expert4", devices)
  params = random_params(layer, x, seed=0)
  with nn.logical_axis_rules(RULES[rules]):
    param_shardings = shardings_of(layer, x, mask, mesh)
  expert_axes = "expert" if rules == "experts_on_expert_axis" else ("data", "expert")
  assert param_shardings["w_in"].spec == PartitionSpec(expert_axes, None, "model")
  with sharding.activate(mesh, RULES[rules]):

    def train_step(params, x):
      def loss(params):
        y, aux = layer.apply({"params": params}, x, mask, train=False)
        return jnp.mean(jnp.square(y - 1.0)) + aux

      grads = jax.grad(loss)(params)
      return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    x_sharding = NamedSharding(mesh, PartitionSpec(("data", "expert")))
    step = jax.jit(
      train_step, in_shardings=(param_shardings, x_sharding), out_shardings=param_shardings
    )
    hlo = step.lower(params, x).compile().as_text()
  assert collective_lines(hlo, "all-to-all"), "expected the dispatch to be an all-to-all"
  # Expert weights live as [E/4, d, h] (or [E/8, ...]) per device; no all-gather may rebuild them.
  expert_shapes = {f"f32[{a},{b},{c}]" for a in (1, 2, 8) for b, c in ((D, 32), (32, D))}
  for line in collective_lines(hlo, "all-gather"):
    assert not any(shape in line for shape in expert_shapes), line
  # Experts replicated over `data` need their gradients summed over it; on every device, not.
  reduced = [s for line in collective_lines(hlo, "all-reduce") for s in expert_shapes if s in line]
  assert bool(reduced) == (rules == "experts_on_expert_axis"), reduced


# ----------------------------------------------------------------------------------------------
# Bad configs fail before compiling, with one line naming the field.


@pytest.mark.parametrize(
  "change,mesh_shape,field",
  [
    ({"num_experts": 6}, {"data": 2, "expert": 4}, "num_experts"),
    ({"k": 9}, {}, "k"),
    ({"k": 0}, {}, "k"),
    ({"capacity_factor_train": 0.0}, {}, "capacity_factor_train"),
    ({"capacity_factor_eval": -1.0}, {}, "capacity_factor_eval"),
    ({"balance_loss": "l2"}, {}, "balance_loss"),
    ({"dispatch": "sorted"}, {}, "dispatch"),
  ],
)
def test_bad_config_raises_one_line_config_error(change, mesh_shape, field):
  validate_moe_config(GOOD, mesh_shape)  # the unchanged config is fine
  with pytest.raises(ConfigError, match=rf"^config\.model\.moe\.{field}=") as info:
    validate_moe_config({**GOOD, **change}, mesh_shape)
  assert "\n" not in str(info.value)


def test_layer_rejects_experts_not_dividing_the_mesh_before_compiling(devices):
  layer = MoE.from_config({**GOOD, "num_experts": 6, "eval_drops": False})
  mesh = mesh_for("data2_expert4", devices)
  x = jnp.zeros((8, 4, D))
  with sharding.activate(mesh), pytest.raises(ConfigError, match="num_experts=6"):
    jax.eval_shape(lambda: layer.init(jax.random.key(0), x, None))


def test_from_config_reads_every_field():
  from configs.multimodel import get_config

  moe_config = get_config("tiny").model.moe
  layer = MoE.from_config(moe_config, dtype="float32")
  for name in moe_lib.CONFIG_FIELDS:
    assert getattr(layer, name) == moe_config[name], name


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_bfloat16_activations_track_float32(dispatch):
  x, mask = random_inputs(4, 16, seed=4)
  layers = [make_layer(dispatch=dispatch, dtype=dtype) for dtype in (jnp.float32, jnp.bfloat16)]
  params = random_params(layers[0], x, seed=6)

  def loss(layer, params):
    y, aux = layer.apply({"params": params}, jnp.asarray(x, layer.dtype), mask, train=False)
    return jnp.sum(jnp.sin(y.astype(jnp.float32))) + aux

  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
  (v32, g32), (v16, g16) = (grad_fn(layer, params) for layer in layers)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
  np.testing.assert_allclose(v16, v32, rtol=0.05, atol=0.5)
  for name in g32:
    scale = np.abs(np.asarray(g32[name])).max()
    np.testing.assert_allclose(g16[name], g32[name], atol=0.05 * scale, err_msg=name)
