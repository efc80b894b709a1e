"""Sparsely-gated mixture of experts (Shazeer et al. 2017) with expert parallelism.

Routing is noisy top-k gating in float32. Two ways to move tokens to experts, picked by config:

- "capacity": tokens are split into routing groups; each expert takes at most `capacity` tokens of
  a group and the rest are dropped (GShard/Switch). Dispatch and combine are index gathers, not
  one-hot einsums, so their cost does not grow with the number of experts; sharding constraints
  move the dispatched buffer from the group axis onto the expert axis, so XLA emits all-to-all.
- "dropless": every token reaches its experts: tokens are sorted by expert and multiplied with
  `jax.lax.ragged_dot` inside `jax.shard_map`, with an explicit all-to-all over the expert axis.

At inference (train=False) the capacity path never drops a token when `eval_drops` is False, the
MultiModel's setting (configs/multimodel.py, and `from_config`'s default): the capacity is raised
to the group size (a token picks k distinct experts, so no expert can receive more than one
assignment per token). A token's output then depends on no other token, which is what lets cached
decoding (one position at a time) reproduce full recomputation exactly. The price is E / k times
the expert FLOPs of the kept tokens at eval; set `eval_drops=True` (capacity_factor_eval decides;
the layer's own default, for use outside the MultiModel) for large E where that matters more than
exact incremental decoding, or use dispatch="dropless".
"""

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mm_jax.errors import ConfigError

BALANCE_LOSSES = ("cv", "switch")
DISPATCHES = ("capacity", "dropless")
CONFIG_FIELDS = (
  "num_experts",
  "k",
  "hidden",
  "capacity_factor_train",
  "capacity_factor_eval",
  "group_size",
  "noisy_gating",
  "balance_loss",
  "balance_coef",
  "z_loss_coef",
  "dispatch",
)
NOISE_EPSILON = 1e-2  # Floor on the gating noise scale, as in Shazeer et al.'s code.


def validate_moe_config(
  moe_config: Any, mesh_shape: Mapping[str, int], expert_axes: tuple[str, ...] = ("expert",)
) -> None:
  """Raises ConfigError (one line naming the field) for settings that cannot compile or route.

  `expert_axes`: the mesh axes the `expert` logical axis is split over (config.mesh_rules).
  """

  def get(name):
    return moe_config[name] if isinstance(moe_config, Mapping) else getattr(moe_config, name)

  where = "config.model.moe"
  num_experts, k = int(get("num_experts")), int(get("k"))
  if num_experts < 1:
    raise ConfigError(f"{where}.num_experts={num_experts}: use at least 1 expert")
  if k < 1:
    raise ConfigError(f"{where}.k={k}: each token needs at least one expert, set k >= 1")
  if k > num_experts:
    raise ConfigError(f"{where}.k={k} exceeds num_experts={num_experts}: set k <= num_experts")
  for name in ("hidden", "group_size"):
    if int(get(name)) < 1:
      raise ConfigError(f"{where}.{name}={get(name)}: use a positive size")
  for name in ("capacity_factor_train", "capacity_factor_eval"):
    if not float(get(name)) > 0:
      raise ConfigError(f"{where}.{name}={get(name)}: use a capacity factor > 0 (e.g. 1.25)")
  if get("balance_loss") not in BALANCE_LOSSES:
    raise ConfigError(
      f"{where}.balance_loss={get('balance_loss')!r}: use one of {', '.join(BALANCE_LOSSES)}"
    )
  if get("dispatch") not in DISPATCHES:
    raise ConfigError(f"{where}.dispatch={get('dispatch')!r}: use one of {', '.join(DISPATCHES)}")
  expert_ways = math.prod(int(mesh_shape.get(a, 1)) for a in expert_axes)
  if num_experts % expert_ways:
    sizes = " x ".join(f"config.mesh.{a}={int(mesh_shape.get(a, 1))}" for a in expert_axes)
    raise ConfigError(
      f"{where}.num_experts={num_experts} is not divisible by the mesh axes experts are split "
      f"over ({sizes}): make num_experts a multiple of {expert_ways}"
    )
  model_ways = int(mesh_shape.get("model", 1))
  if int(get("hidden")) % model_ways:
    raise ConfigError(
      f"{where}.hidden={get('hidden')} is not divisible by the model mesh axis "
      f"(config.mesh.model={model_ways}): make hidden a multiple of it"
    )


# ----------------------------------------------------------------------------------------------
# Mesh and sharding helpers: the layer shards only when a mesh is in context.


def ambient_mesh():
  """The mesh set by `jax.set_mesh(mesh)` (sharding.activate), or None: the layer's programs
  are traced under it, and shard_map and sharding constraints take its abstract form."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def _mesh_axes(logical_name: str) -> tuple[str, ...]:
  """Mesh axes a logical name maps to under the current flax rules ((), when unsharded)."""
  axes = nn.logical_to_mesh_axes((logical_name,))
  axes = None if axes is None else axes[0]
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def _ways(mesh, axes: tuple[str, ...]) -> int:
  return math.prod(mesh.shape[a] for a in axes) if mesh is not None else 1


def _spec_entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def _constrain(x, mesh, *dims: tuple[str, ...]):
  """with_sharding_constraint by mesh axes per dimension; a no-op without a mesh."""
  if mesh is None or mesh.size == 1:
    return x
  # A bare spec resolves against the mesh jax.set_mesh installed: the concrete one when the
  # layer runs eagerly, its abstract form under jit.
  return jax.lax.with_sharding_constraint(x, PartitionSpec(*(_spec_entry(d) for d in dims)))


class Layout(NamedTuple):
  """Mesh axes of the layer's logical dimensions (empty tuples without a mesh)."""

  mesh: Any
  batch: tuple[str, ...]
  group: tuple[str, ...]
  expert: tuple[str, ...]
  embed: tuple[str, ...]
  hidden: tuple[str, ...]

  @classmethod
  def current(cls) -> "Layout":
    mesh = ambient_mesh()
    if mesh is None:
      return cls(None, (), (), (), (), ())
    names = ("batch", "group", "expert", "embed", "expert_mlp")
    batch, group, expert, embed, hidden = (
      tuple(a for a in _mesh_axes(n) if a in mesh.shape) for n in names
    )
    # Activations are [batch, length, embed]: a mesh axis the batch takes is not the embedding's
    # too (as flax resolves the same names: FSDP splits only the parameters' embed axis).
    embed = tuple(a for a in embed if a not in batch)
    return cls(mesh, batch, group, expert, embed, hidden)

  @property
  def group_without_expert(self) -> tuple[str, ...]:
    """Axes the group dimension keeps while the expert dimension is split (GShard layout)."""
    return tuple(a for a in self.group if a not in self.expert)


# ----------------------------------------------------------------------------------------------
# Routing: noisy top-k gating and the balance losses, all float32.


class Routing(NamedTuple):
  expert_index: jax.Array  # int32 [..., k], best expert first
  gates: jax.Array  # float32 [..., k], softmax over the k chosen logits
  mask: jax.Array  # float32 [...], 1 = a real token that is routed


def top_k(values, k: int):
  """lax.top_k by k rounds of argmax: same result and ties (lowest index first), but XLA's SPMD
  partitioner splits it over tokens, where it replicates the TopK custom call."""
  picked_values, picked_index = [], []
  for _ in range(k):
    index = jnp.argmax(values, axis=-1)
    picked_index.append(index)
    picked_values.append(jnp.take_along_axis(values, index[..., None], axis=-1)[..., 0])
    values = jnp.where(jax.nn.one_hot(index, values.shape[-1], dtype=bool), -jnp.inf, values)
  return jnp.stack(picked_values, axis=-1), jnp.stack(picked_index, axis=-1).astype(jnp.int32)


def top_k_gating(logits, k: int):
  values, index = top_k(logits, k)
  return index, jax.nn.softmax(values, axis=-1)


def prob_in_top_k(clean_logits, noisy_logits, noise_std, k: int):
  """P(expert in the top k) under fresh noise on that expert alone (Shazeer et al., eq. 9)."""
  num_experts = clean_logits.shape[-1]
  if k >= num_experts:
    return jnp.ones_like(clean_logits)
  top = top_k(noisy_logits, k + 1)[0]
  threshold_if_in = top[..., k : k + 1]
  threshold_if_out = top[..., k - 1 : k]
  is_in = noisy_logits > threshold_if_in
  normal_cdf = jax.scipy.stats.norm.cdf
  prob_if_in = normal_cdf((clean_logits - threshold_if_in) / noise_std)
  prob_if_out = normal_cdf((clean_logits - threshold_if_out) / noise_std)
  return jnp.where(is_in, prob_if_in, prob_if_out)


def cv_squared(values):
  """Squared coefficient of variation over the last axis; zero for a single expert."""
  if values.shape[-1] == 1:
    return jnp.zeros(values.shape[:-1], values.dtype)
  mean = jnp.mean(values, axis=-1, keepdims=True)
  return jnp.mean(jnp.square(values - mean), axis=-1) / (jnp.square(mean[..., 0]) + 1e-10)


def token_routing(logits, routing: Routing, num_experts: int, load=None) -> dict:
  """Per token and expert [T, E], what the balance losses sum over tokens: "assigned" (1 where
  the expert is among the token's top k), "gate" (the token's gate there), "load" (the smooth
  probability of being in the top k, or "assigned" without noise) and "prob" (the router's
  softmax). Rows of tokens that are not routed are zero."""
  mask = routing.mask[:, None]
  chosen = jax.nn.one_hot(routing.expert_index, num_experts, dtype=jnp.float32)  # [T, k, E]
  assigned = jnp.sum(chosen, axis=1) * mask
  return {
    "assigned": assigned,
    "gate": jnp.einsum("tk,tke->te", routing.gates, chosen) * mask,
    "load": assigned if load is None else load * mask,
    "prob": jax.nn.softmax(logits, axis=-1) * mask,
  }


def balance_from_sums(sums: dict, tokens, k: int, balance_loss: str):
  """The balance loss of some tokens from token_routing's sums over them ([..., E]) and their
  number (`tokens`, [...]): the layer's loss over all its tokens, or one task's over its own."""
  if balance_loss == "cv":
    return cv_squared(sums["gate"]) + cv_squared(sums["load"])
  # "switch": E * sum_e (fraction of assignments to e) * (mean router probability of e)
  real = jnp.maximum(tokens, 1.0)[..., None]
  num_experts = sums["prob"].shape[-1]
  return num_experts * jnp.sum(sums["assigned"] / (k * real) * sums["prob"] / real, axis=-1)


def router_losses(logits, routing: Routing, num_experts: int, balance_loss: str, load=None):
  """Balance loss, z-loss and routing statistics over the real tokens.

  `logits` [T, E] are the ones routing used; `load` [T, E] is the smooth probability of being in
  the top k (noise on) or None for hard counts.
  """
  real = jnp.maximum(jnp.sum(routing.mask), 1.0)
  k = routing.expert_index.shape[-1]
  sums = {
    name: jnp.sum(v, axis=0)
    for name, v in token_routing(logits, routing, num_experts, load).items()
  }
  balance = balance_from_sums(sums, real, k, balance_loss)
  z_loss = jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * routing.mask) / real
  probs = jax.nn.softmax(logits, axis=-1)
  entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
  stats = {
    "expert_load": sums["assigned"] / (k * real),
    "router_entropy": jnp.sum(entropy * routing.mask) / real,
    "router_confidence": jnp.sum(jnp.max(probs, axis=-1) * routing.mask) / real,
  }
  return balance, z_loss, stats


def task_routing_sums(tasks, logits, routing: Routing, kept, num_experts: int, load=None) -> dict:
  """Per task, sums over its routed tokens: token_routing's [num_tasks, E], "kept" [num_tasks, E]
  (assignments that reached their expert) and "tokens" [num_tasks].

  `tasks` [T, num_tasks] is each token's task, one-hot; `kept` [T, k] marks the token's
  assignments that got an expert's slot. Sums add up over microbatches and routing groups, so the
  shares and per-task losses follow from them wherever the tokens were split.
  """
  tasks = tasks.astype(jnp.float32) * routing.mask[:, None]
  per_token = token_routing(logits, routing, num_experts, load)
  chosen = jax.nn.one_hot(routing.expert_index, num_experts, dtype=jnp.float32)
  per_token["kept"] = jnp.einsum("tk,tke->te", kept.astype(jnp.float32), chosen)
  exact = jax.lax.Precision.HIGHEST  # counts: no bfloat16 passes on accelerators
  sums = {name: jnp.einsum("tn,te->ne", tasks, v, precision=exact) for name, v in per_token.items()}
  sums["tokens"] = jnp.sum(tasks, axis=0)
  return sums


# ----------------------------------------------------------------------------------------------
# Capacity path: groups, slots, gather-based dispatch and combine.


def routing_group_size(num_tokens: int, group_size: int, group_ways: int) -> int:
  """Largest group size <= group_size that tiles the tokens into a multiple of group_ways groups.

  Groups then never straddle two devices' shards of the batch.
  """
  per_shard = num_tokens // group_ways if num_tokens % group_ways == 0 else num_tokens
  size = min(group_size, per_shard)
  while per_shard % size:
    size -= 1
  return size


def expert_capacity(group_size: int, k: int, num_experts: int, capacity_factor: float) -> int:
  return max(1, math.ceil(capacity_factor * group_size * k / num_experts))


class Slots(NamedTuple):
  """Where each (token, choice) lands and which assignment fills each expert slot, per group."""

  position: jax.Array  # int32 [G, S, k]: expert * C + slot, or E * C when dropped / padding
  source: jax.Array  # int32 [G, E * C]: token filling the slot, or S when the slot is empty
  gate: jax.Array  # float32 [G, E * C]: gate of that assignment, 0 when empty
  kept: jax.Array  # float32 [G, S, k]: 1 where the assignment got a slot


def assign_slots(routing: Routing, num_experts: int, capacity: int) -> Slots:
  """Slots by priority: every group's top-1 choices first, then top-2, ..., in token order.

  A stable sort by expert replaces the one-hot cumsum, so the cost does not grow with E.
  """
  groups, size, k = routing.expert_index.shape
  # Assignment a = choice * S + token (choice-major gives the priority order).
  expert = jnp.swapaxes(routing.expert_index, 1, 2).reshape(groups, k * size)
  routed = jnp.tile(routing.mask > 0, (1, k))
  key = jnp.where(routed, expert, num_experts)
  order = jnp.argsort(key, axis=-1, stable=True)
  sorted_key = jnp.take_along_axis(key, order, axis=-1)
  first = jax.vmap(lambda s: jnp.searchsorted(s, jnp.arange(num_experts + 1), side="left"))(
    sorted_key
  )  # [G, E + 1]: where each expert's run starts in sorted order
  start = jnp.take_along_axis(first, sorted_key, axis=-1)
  rank_sorted = jnp.arange(k * size)[None, :] - start
  rank = jnp.take_along_axis(rank_sorted, jnp.argsort(order, axis=-1), axis=-1)
  kept = routed & (rank < capacity)
  position = jnp.where(kept, expert * capacity + rank, num_experts * capacity)
  # Slot (e, c) holds sorted assignment first[e] + c when c < count(e) and c < capacity.
  count = first[:, 1:] - first[:, :-1]  # [G, E]
  slot = jnp.arange(capacity)
  index = first[:, :-1, None] + slot[None, None, :]  # [G, E, C]
  filled = slot[None, None, :] < count[:, :, None]
  index = jnp.minimum(index, k * size - 1).reshape(groups, -1)
  assignment = jnp.take_along_axis(order, index, axis=-1)
  filled = filled.reshape(groups, -1)
  source = jnp.where(filled, assignment % size, size)
  gates = jnp.swapaxes(routing.gates, 1, 2).reshape(groups, k * size)
  gate = jnp.where(filled, jnp.take_along_axis(gates, assignment, axis=-1), 0.0)
  position = jnp.swapaxes(position.reshape(groups, k, size), 1, 2)
  kept = jnp.swapaxes(kept.reshape(groups, k, size), 1, 2).astype(jnp.float32)
  return Slots(position.astype(jnp.int32), source.astype(jnp.int32), gate, kept)


def _gather_rows(table, index):
  """table [G, N, d], index [G, ...] -> [G, ..., d]; index N reads a zero row."""
  padded = jnp.pad(table, ((0, 0), (0, 1), (0, 0)))
  flat = index.reshape(index.shape[0], -1)
  rows = jnp.take_along_axis(padded, flat[:, :, None], axis=1)
  return rows.reshape(*index.shape, table.shape[-1])


@jax.custom_vjp
def dispatch_rows(x, source, position):
  """x [G, S, d] -> [G, E*C, d] by slot sources; its transpose is a gather too (no scatter)."""
  return _gather_rows(x, source)


def _dispatch_fwd(x, source, position):
  return _gather_rows(x, source), (source, position)


def _dispatch_bwd(residuals, grad):
  source, position = residuals
  dx = jnp.sum(_gather_rows(grad, position), axis=2)  # each token reads back its k slots
  return dx, None, None


dispatch_rows.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def combine_rows(expert_out, slots_gate, position, source, gates):
  """y[g, s] = sum_j gates[g, s, j] * expert_out[g, position[g, s, j]] (dropped: zero)."""
  return jnp.einsum("gskd,gsk->gsd", _gather_rows(expert_out, position), gates)


def _combine_fwd(expert_out, slots_gate, position, source, gates):
  rows = _gather_rows(expert_out, position)
  y = jnp.einsum("gskd,gsk->gsd", rows, gates)
  return y, (rows, slots_gate, position, source, gates)


def _combine_bwd(residuals, grad):
  rows, slots_gate, position, source, gates = residuals
  d_out = _gather_rows(grad, source) * slots_gate[..., None]
  d_gates = jnp.einsum("gskd,gsd->gsk", rows, grad)
  return d_out, None, None, None, d_gates


combine_rows.defvjp(_combine_fwd, _combine_bwd)


def capacity_experts(x, routing: Routing, w_in, w_out, capacity: int, layout: Layout, dtype):
  """x [G, S, d] -> (y [G, S, d], kept [G, S, k]) through capacity-limited experts."""
  groups, size, d = x.shape
  num_experts = w_in.shape[0]
  slots = assign_slots(routing, num_experts, capacity)
  gates = routing.gates * slots.kept
  dispatched = dispatch_rows(x.astype(dtype), slots.source, slots.position)
  dispatched = dispatched.reshape(groups, num_experts, capacity, d)
  dispatched = _constrain(dispatched, layout.mesh, layout.group, (), (), ())
  # Expert-major, so each expert's slots of all groups are one contiguous matmul; with a mesh,
  # this re-layout from token-sharded to expert-sharded is the all-to-all.
  dispatched = jnp.swapaxes(dispatched, 0, 1)
  expert_sharded = (layout.expert, layout.group_without_expert, (), ())
  dispatched = _constrain(dispatched, layout.mesh, *expert_sharded)
  # One [G*C, d] matmul per expert: faster on CPU than keeping G and C apart.
  rows = dispatched.reshape(num_experts, groups * capacity, d)
  hidden = nn.relu(jnp.einsum("end,edh->enh", rows, w_in.astype(dtype)))
  hidden = _constrain(
    hidden, layout.mesh, layout.expert, layout.group_without_expert, layout.hidden
  )
  out = jnp.einsum("enh,ehd->end", hidden, w_out.astype(dtype))
  out = out.reshape(num_experts, groups, capacity, d)
  out = _constrain(out, layout.mesh, *expert_sharded)
  out = jnp.swapaxes(out, 0, 1)
  out = _constrain(out, layout.mesh, layout.group, (), (), ())  # the all-to-all back
  out = out.reshape(groups, num_experts * capacity, d)
  y = combine_rows(out, slots.gate.astype(dtype), slots.position, slots.source, gates.astype(dtype))
  return y, slots.kept


# ----------------------------------------------------------------------------------------------
# Dropless path: sort by expert, ragged_dot, explicit all-to-all inside shard_map.


def _ffn_ragged(rows, group_sizes, w_in, w_out, model_axes):
  hidden = nn.relu(jax.lax.ragged_dot(rows, w_in, group_sizes))
  out = jax.lax.ragged_dot(hidden, w_out, group_sizes)
  return jax.lax.psum(out, model_axes) if model_axes else out


def _sorted_by(key, num_keys: int):
  """Stable order of `key` and where each key value's run starts ([num_keys + 1])."""
  order = jnp.argsort(key, stable=True)
  starts = jnp.searchsorted(key[order], jnp.arange(num_keys + 1), side="left")
  return order, starts


def dropless_local(x, expert_index, gates, mask, w_in, w_out, expert_axes, expert_ways, model_axes):
  """One shard's tokens x [t, d] through all their experts; experts sharded `expert_ways` ways."""
  tokens, d = x.shape
  k = expert_index.shape[-1]
  local_experts = w_in.shape[0]
  num_experts = local_experts * expert_ways
  key = jnp.where(mask[:, None] > 0, expert_index, num_experts).reshape(-1)  # token-major
  order, starts = _sorted_by(key, num_experts)
  rows = x[order // k]
  if expert_ways == 1:
    out_sorted = _ffn_ragged(rows, starts[1:] - starts[:-1], w_in, w_out, model_axes)
  else:
    # Fixed-size buffers (a full shard's assignments per destination) keep it dropless without
    # ragged_all_to_all, which XLA:CPU lacks.
    sorted_key = key[order]
    first = starts[::local_experts]  # [ways + 1]: run of each destination shard
    slot = jnp.arange(tokens * k)
    index = first[:-1, None] + slot[None, :]  # [ways, t*k]
    valid = slot[None, :] < (first[1:] - first[:-1])[:, None]
    index = jnp.minimum(index, tokens * k - 1)
    send = jnp.where(valid[..., None], rows[index], 0)
    send_key = jnp.where(valid, sorted_key[index] % local_experts, local_experts)
    recv = jax.lax.all_to_all(send, expert_axes, 0, 0, tiled=True)
    recv_key = jax.lax.all_to_all(send_key, expert_axes, 0, 0, tiled=True)
    recv_order, recv_starts = _sorted_by(recv_key.reshape(-1), local_experts)
    recv_rows = recv.reshape(-1, d)[recv_order]
    group_sizes = recv_starts[1:] - recv_starts[:-1]
    out = _ffn_ragged(recv_rows, group_sizes, w_in, w_out, model_axes)
    out = jnp.zeros_like(out).at[recv_order].set(out).reshape(expert_ways, tokens * k, d)
    back = jax.lax.all_to_all(out, expert_axes, 0, 0, tiled=True)
    destination = jnp.minimum(sorted_key // local_experts, expert_ways - 1)
    rank = slot - first[destination]
    out_sorted = back[destination, jnp.clip(rank, 0, tokens * k - 1)]
    out_sorted = jnp.where((sorted_key < num_experts)[:, None], out_sorted, 0)
  per_choice = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(tokens, k, d)
  return jnp.einsum("tkd,tk->td", per_choice, gates * mask[:, None])


def dropless_experts(x, routing: Routing, w_in, w_out, layout: Layout, dtype):
  """x [B, L, d] -> y [B, L, d]; every routed token reaches all k of its experts."""
  batch, length, d = x.shape
  k = routing.expert_index.shape[-1]
  flat = (x.reshape(-1, d).astype(dtype), routing.expert_index.reshape(-1, k))
  flat += (routing.gates.reshape(-1, k).astype(dtype), routing.mask.reshape(-1))
  weights = (w_in.astype(dtype), w_out.astype(dtype))
  mesh = layout.mesh
  if mesh is None or mesh.size == 1:
    y = dropless_local(*flat, *weights, (), 1, ())
    return y.reshape(batch, length, d)
  expert_ways = _ways(mesh, layout.expert)
  model_axes = tuple(a for a in layout.hidden if mesh.shape[a] > 1)

  def local(x, index, gates, mask, w_in, w_out):
    return dropless_local(
      x, index, gates, mask, w_in, w_out, layout.expert, expert_ways, model_axes
    )

  token = PartitionSpec(_spec_entry(layout.batch))
  w_in_spec = PartitionSpec(_spec_entry(layout.expert), None, _spec_entry(layout.hidden))
  w_out_spec = PartitionSpec(_spec_entry(layout.expert), _spec_entry(layout.hidden), None)
  y = jax.shard_map(
    local,
    in_specs=(token, token, token, token, w_in_spec, w_out_spec),
    out_specs=token,
    check_vma=False,
  )(*flat, *weights)
  return y.reshape(batch, length, d)


# ----------------------------------------------------------------------------------------------
# The layer.


class MoE(nn.Module):
  """Noisy top-k mixture of ReLU experts; returns (y without the residual, aux loss)."""

  num_experts: int
  k: int = 2
  hidden: int = 256
  capacity_factor_train: float = 1.25
  capacity_factor_eval: float = 2.0
  group_size: int = 1024
  noisy_gating: bool = True
  balance_loss: str = "cv"
  balance_coef: float = 0.01
  z_loss_coef: float = 0.0
  dispatch: str = "capacity"
  eval_drops: bool = True
  dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, moe_config, dtype=jnp.float32, **kwargs) -> "MoE":
    fields = {name: moe_config[name] for name in CONFIG_FIELDS}
    fields["eval_drops"] = bool(moe_config["eval_drops"])
    return cls(**fields, dtype=jnp.dtype(dtype), **kwargs)

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool = False, tasks=None):
    """x [batch, length, d] -> (y, aux loss). `tasks` [batch, length, num_tasks] (optional) is
    each token's task, one-hot: the layer then sows its routing per task ("task_routing",
    task_routing_sums) beside its other statistics, from the same routing decisions."""
    layout = Layout.current()
    mesh_shape = dict(layout.mesh.shape) if layout.mesh is not None else {}
    validate_moe_config(self, mesh_shape, layout.expert)
    batch, length, d = x.shape
    num_experts, dtype = self.num_experts, jnp.dtype(self.dtype)
    mask = jnp.ones((batch, length), jnp.float32) if mask is None else mask.astype(jnp.float32)
    x = _constrain(x, layout.mesh, layout.batch, (), layout.embed)

    w_gate = self.param(
      "gate", nn.with_logical_partitioning(nn.initializers.zeros, ("embed", None)), (d, num_experts)
    )
    expert_init = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
    w_in = self.param(
      "w_in",
      nn.with_logical_partitioning(expert_init, ("expert", "embed", "expert_mlp")),
      (num_experts, d, self.hidden),
    )
    w_out = self.param(
      "w_out",
      nn.with_logical_partitioning(expert_init, ("expert", "expert_mlp", "embed")),
      (num_experts, self.hidden, d),
    )

    # Router math stays token-sharded: without these constraints XLA replicates it.
    tokens = _constrain(x.reshape(-1, d).astype(jnp.float32), layout.mesh, layout.batch, ())
    logits = _constrain(tokens @ w_gate, layout.mesh, layout.batch, ())
    load = None
    if self.noisy_gating:
      w_noise = self.param(
        "noise",
        nn.with_logical_partitioning(nn.initializers.zeros, ("embed", None)),
        (d, num_experts),
      )
      if train:
        noise_std = jax.nn.softplus(tokens @ w_noise) + NOISE_EPSILON
        noise = jax.random.normal(self.make_rng("gating"), logits.shape, jnp.float32)
        noise = _constrain(noise, layout.mesh, layout.batch, ())
        clean, logits = logits, logits + noise * noise_std
        load = prob_in_top_k(clean, logits, noise_std, self.k)
    index, gates = top_k_gating(logits, self.k)
    flat_routing = Routing(index, gates, mask.reshape(-1))
    balance, z_loss, stats = router_losses(
      logits, flat_routing, num_experts, self.balance_loss, load
    )

    if self.dispatch == "dropless":
      routing = Routing(index.reshape(batch, length, -1), gates.reshape(batch, length, -1), mask)
      y = dropless_experts(x, routing, w_in, w_out, layout, dtype)
      fraction_dropped = jnp.zeros((), jnp.float32)
      kept = jnp.ones(index.shape, jnp.float32)
    else:
      factor = self.capacity_factor_train if train else self.capacity_factor_eval
      group_ways = _ways(layout.mesh, layout.group)
      size = routing_group_size(batch * length, self.group_size, group_ways)
      capacity = expert_capacity(size, self.k, num_experts, factor)
      if not train and not self.eval_drops:
        capacity = size  # never drops: see the module docstring
      groups = batch * length // size
      routing = Routing(
        index.reshape(groups, size, -1), gates.reshape(groups, size, -1), mask.reshape(groups, size)
      )
      grouped = _constrain(x.reshape(groups, size, d), layout.mesh, layout.group, (), ())
      y, kept = capacity_experts(grouped, routing, w_in, w_out, capacity, layout, dtype)
      assignments = jnp.maximum(jnp.sum(routing.mask) * self.k, 1.0)
      fraction_dropped = 1.0 - jnp.sum(kept * routing.mask[..., None]) / assignments
      y = y.reshape(batch, length, d)
      kept = kept.reshape(-1, self.k)
    if tasks is not None:
      flat_tasks = tasks.reshape(batch * length, -1)
      sums = task_routing_sums(flat_tasks, logits, flat_routing, kept, num_experts, load)
      self.sow("intermediates", "task_routing", sums)
    y = _constrain(y.astype(x.dtype), layout.mesh, layout.batch, (), layout.embed)

    aux_loss = self.balance_coef * balance + self.z_loss_coef * z_loss
    for name, value in {
      "balance_loss": balance,
      "z_loss": z_loss,
      "aux_loss": aux_loss,
      "fraction_dropped": fraction_dropped,
      **stats,
    }.items():
      self.sow("intermediates", name, value)
    return y, aux_loss.astype(jnp.float32)
