"""The train step and the train state: what one optimizer update computes, and the state it
updates. The model knows nothing of this; the training loop (train.py), ahead-of-time compilation
(aot.py), prediction and the benches use it through the run builder (run.py).

Every step carries one batch per task group (tasks sharing a signature and shapes are concatenated
on the host, see grouping.py); the step runs the modality nets per group and the shared body once
over all groups packed together (config.model.pack_groups, models/packing.py; or once per group,
unrolled at trace time), sums the per-task losses and the MoE balance losses, and makes one
optimizer update. A one-entry mixture is the single-task baseline, with no other code path.
"""

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import jaxpr_as_fun

from mm_jax import expert_load as expert_load_lib
from mm_jax import grouping, losses, optimizer, sharding, validation
from mm_jax.data import layout


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: dict
  opt_state: Any
  # Consecutive steps whose loss or gradients were not finite (their updates were skipped).
  nonfinite_streak: jax.Array
  nonfinite_total: jax.Array


def _rngs(rng, step, group_index):
  key = jax.random.fold_in(jax.random.fold_in(rng, step), group_index)
  dropout, gating = jax.random.split(key)
  return {"dropout": dropout, "gating": gating}


def _task_sums(stats, task_index, num_tasks):
  """Per-task sums of per-example stats, selected by the example's task index."""
  per_task = []
  for i in range(num_tasks):
    selected = (task_index == i).astype(jnp.float32)
    per_task.append({k: jnp.sum(v * selected) for k, v in stats.items()})
  return per_task


def task_token_counts(batches, plan):
  """Each task's target tokens in `batches`: the per-token means' denominators."""
  counts = {}
  for group in plan:
    batch = batches[group.name]
    weights = losses.target_weights(batch["targets"], group.signature.target_modality)
    per_example = {"tokens": weights.reshape(weights.shape[0], -1).sum(-1)}
    task_sums = _task_sums(per_example, batch["task_index"], len(group.tasks))
    counts.update({task: sums["tokens"] for task, sums in zip(group.tasks, task_sums)})
  return counts


def forward_losses(
  model,
  params,
  batches,
  plan,
  *,
  train,
  rng,
  step,
  label_smoothing,
  loss_weights=None,
  token_counts=None,
  aux_weight=1.0,
  expert_load=False,
):
  """Total loss, per-task sums over all groups, the auxiliary loss and, with `expert_load`, the
  MoE layers' per-task routing sums ({layer: sums}, expert_load.py; else {}): the body of the
  train step.

  Each task adds its per-token mean loss times its weight (config.train.loss_weights, default 1):
  the batch share sets how many examples a task sees, the weight how hard the shared parameters
  are pulled towards it. A microbatch passes the whole step's `token_counts` as the means'
  denominators, and its share of the auxiliary losses as `aux_weight`, so that the microbatches'
  losses (and gradients) add up to the whole batch's.
  """
  loss_weights = loss_weights or {}
  model_batches = {g.name: _model_inputs(batches[g.name]) for g in plan}
  if expert_load:  # each example's task, for the MoE layers' per-task sums
    num_tasks = sum(len(g.tasks) for g in plan)
    for group, offset in zip(plan, task_offsets(plan)):
      task_index = batches[group.name]["task_index"]
      model_batches[group.name]["task_onehot"] = expert_load_lib.task_onehot(
        task_index, offset, num_tasks
      )
  routing = {}

  def apply(*args, **kwargs):
    if not expert_load:
      return model.apply({"params": params}, *args, **kwargs)
    out, state = model.apply({"params": params}, *args, mutable=["intermediates"], **kwargs)
    for layer, sums in expert_load_lib.routing_sums(state.get("intermediates", {})).items():
      routing[layer] = expert_load_lib.add(routing.get(layer), sums)
    return out

  if model.config.pack_groups:  # one body pass over all groups (packing.py)
    logits, total_aux = apply(
      model_batches,
      {g.name: g.signature for g in plan},
      train=train,
      rngs=_rngs(rng, step, 0) if train else {},
      method="packed",
    )
  else:
    logits, total_aux = {}, jnp.zeros((), jnp.float32)
    for group_index, group in enumerate(plan):
      logits[group.name], aux = apply(
        model_batches[group.name],
        group.signature,
        train=train,
        rngs=_rngs(rng, step, group_index) if train else {},
      )
      total_aux += aux
  total_task_loss = jnp.zeros((), jnp.float32)
  per_task = {}
  for group in plan:
    batch = batches[group.name]
    stats = losses.example_stats(
      logits[group.name], batch["targets"], group.signature.target_modality, label_smoothing
    )
    for task, sums in zip(group.tasks, _task_sums(stats, batch["task_index"], len(group.tasks))):
      per_task[task] = sums
      weight = loss_weights.get(task, 1.0)
      tokens = sums["tokens"] if token_counts is None else token_counts[task]
      total_task_loss += weight * sums["loss"] / jnp.maximum(tokens, 1.0)
  total_aux = aux_weight * total_aux
  return total_task_loss + total_aux, (per_task, total_aux, routing)


def task_offsets(plan) -> list[int]:
  """Each group's first task's row among all the plan's tasks (in group order)."""
  sizes = [len(g.tasks) for g in plan]
  return [sum(sizes[:i]) for i in range(len(plan))]


def expert_load_metrics(model, plan, routing) -> dict:
  """The per-task expert load scalars (expert_load.py) of one step's routing sums."""
  if not routing:
    return {}
  names = [t for g in plan for t in g.tasks]
  language = {t for g in plan if g.signature.target_modality == "language" for t in g.tasks}
  rows = expert_load_lib.tasks_by_layer(routing, names, language)
  moe_config = model.config.moe
  return expert_load_lib.metrics(routing, rows, moe_config.k, moe_config.balance_loss)


def inject_nonfinite(grads, step, steps):
  """Fault injection (config.train.inject_nonfinite_steps): NaN gradients at those steps.

  Empty `steps` traces nothing, so a normal run's compiled step is unchanged.
  """
  if not steps:
    return grads
  hit = jnp.isin(step, jnp.asarray(steps, jnp.int32))
  return jax.tree.map(lambda g: jnp.where(hit, jnp.nan, g), grads)


def split_microbatches(batches, count: int):
  """[B, ...] -> [count, B / count, ...]; microbatch i holds rows i, i + count, i + 2 count, ...

  Strided, not contiguous: while each device's shard of B is a multiple of `count` rows (the
  config is validated for it), every microbatch takes the same rows from every shard, so the
  split moves no data between devices.
  """

  def split(x):
    y = jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)
    return nn.with_logical_constraint(y, (None, "batch") + (None,) * (y.ndim - 2))

  return jax.tree.map(split, batches)


def accumulated_gradients(loss_fn, params, batches, plan, rng, count: int):
  """`jax.value_and_grad(loss_fn, has_aux=True)` of the whole batch, one microbatch at a time.

  A scan over `count` microbatches holds one microbatch's activations at a time and sums the
  gradients in float32. `loss_fn(params, batch, rng, token_counts, aux_weight)` must return
  (loss, (per-task sums, aux)); the whole batch's token counts make the per-token means add up
  exactly, while each microbatch's auxiliary losses (MoE balance, CTC) count 1/count: their mean.
  """
  token_counts = task_token_counts(batches, plan)

  def accumulate(grad_sum, xs):
    index, batch = xs
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, extras), grads = grad_fn(
      params, batch, jax.random.fold_in(rng, index), token_counts, 1.0 / count
    )
    grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
    return grad_sum, (loss, extras)

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  xs = (jnp.arange(count), split_microbatches(batches, count))
  grad_sum, (loss, extras) = jax.lax.scan(accumulate, zeros, xs)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grad_sum, params)
  return (loss.sum(), jax.tree.map(lambda x: x.sum(0), extras)), grads


def train_step(
  state,
  batches,
  rng,
  *,
  model,
  tx,
  plan,
  label_smoothing,
  loss_weights=None,
  inject_nonfinite_steps=(),
  microbatches=1,
  flat_optimizer=False,
  expert_load=False,
):
  """One optimizer update from every task group; skipped (and counted) if anything is non-finite.

  `microbatches` > 1 (config.train.microbatches) computes the same update in that many
  sequential pieces: less activation memory for the same batch (accumulated_gradients).
  `flat_optimizer` says that `tx` sees the parameters as one vector (config.optimizer.flatten).
  `expert_load` adds each MoE layer's per-task routing to the metrics (config.train.expert_load).
  """

  def loss_fn(params, batches, rng, token_counts=None, aux_weight=1.0):
    return forward_losses(
      model,
      params,
      batches,
      plan,
      train=True,
      rng=rng,
      step=state.step,
      label_smoothing=label_smoothing,
      loss_weights=loss_weights,
      token_counts=token_counts,
      aux_weight=aux_weight,
      expert_load=expert_load,
    )

  if microbatches == 1:
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (per_task, aux, routing)), grads = grad_fn(state.params, batches, rng)
  else:
    (loss, (per_task, aux, routing)), grads = accumulated_gradients(
      loss_fn, state.params, batches, plan, rng, microbatches
    )
  grads = inject_nonfinite(grads, state.step, inject_nonfinite_steps)
  grad_norm = optimizer.global_norm(grads, flat_optimizer)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  # A branch, not a select per leaf of (params, mu, nu): the default step compiled ~10 CPU-s
  # faster with 760 fewer kernels and 500 fewer copies, and a skipped step does no Adam work.
  def update(params, opt_state):
    updates, new_opt_state = tx.update(grads, opt_state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), new_opt_state

  new_params, new_opt_state = jax.lax.cond(
    finite, update, lambda *old: old, state.params, state.opt_state
  )
  new_state = state.replace(
    step=state.step + 1,
    params=new_params,
    opt_state=new_opt_state,
    nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
    nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
  )
  metrics = {"loss": loss, "moe_aux_loss": aux, "grad_norm": grad_norm}
  for task, sums in per_task.items():
    tokens = jnp.maximum(sums["tokens"], 1.0)
    metrics[f"{task}/loss"] = sums["loss"] / tokens
    metrics[f"{task}/log_perplexity"] = sums["nll"] / tokens
    metrics[f"{task}/accuracy"] = sums["correct"] / tokens
  metrics.update(expert_load_metrics(model, plan, routing))
  return new_state, metrics


def jit_train_step(config, model, tx, plan, mesh, state_shardings, batch_shardings):
  """The jitted step (aot.py compiles this same function for TPU slices ahead of time)."""
  step_fn = functools.partial(
    train_step,
    model=model,
    tx=tx,
    plan=plan,
    label_smoothing=config.train.label_smoothing,
    loss_weights=dict(config.train.loss_weights or {}),
    inject_nonfinite_steps=tuple(config.train.inject_nonfinite_steps),
    microbatches=config.train.microbatches,
    flat_optimizer=optimizer.is_flat(config.optimizer),
    expert_load=config.train.expert_load,
  )
  return jax.jit(
    step_fn,
    in_shardings=(state_shardings, batch_shardings, sharding.replicated(mesh)),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )


def init_state(rng, example_batches, *, model, tx, plan):
  """Parameters of every modality net used by the plan, from one packed pass over all groups.

  A parameter's initial value depends only on its path, so this equals initialising group by group
  and merging (tests/test_packing.py), with one trace instead of one per group.
  """
  variables = model.init(
    {"params": rng, "dropout": rng, "gating": rng},
    {g.name: _model_inputs(example_batches[g.name]) for g in plan},
    {g.name: g.signature for g in plan},
    train=False,
    method="packed",
  )
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    nonfinite_streak=jnp.zeros((), jnp.int32),
    nonfinite_total=jnp.zeros((), jnp.int32),
  )


def _model_inputs(batch):
  return {k: v for k, v in batch.items() if k != "task_index"}


def init_key(config) -> jax.Array:
  """The key the initial parameters are drawn from (config.train.init_prng_impl's generator)."""
  return jax.random.key(config.seed, impl=init_prng_impl(config))


def init_prng_impl(config) -> str:
  return config.train.init_prng_impl


# The init runs once: LLVM at -O0 without its expensive passes, and XLA's elemental emitters,
# compile the default model's threefry init in 12-14 instead of 26 CPU-s (rbg: 9.9 instead of 15),
# and it still runs in under 0.4 s.
RUN_ONCE_CPU_COMPILER_OPTIONS = {
  "xla_backend_optimization_level": 0,
  "xla_llvm_disable_expensive_passes": True,
  "xla_cpu_use_fusion_emitters": False,
}


def traced_init(init, example_specs, mesh, rules, key_impl: str = validation.INIT_PRNG_IMPLS[0]):
  """Traces `init` once: (abstract unboxed state, its shardings, jitted init of that state).

  The jitted init takes only a key of `key_impl`: the state depends on the batch's shapes, not
  its values, so it can run before any data is read. It replays the trace (the model is not
  traced again) and writes every leaf straight to its sharding; call it inside
  `sharding.activate(mesh, rules)`.
  """
  # Abstract: the mesh may be a compile target.
  rng = jax.eval_shape(lambda: jax.random.key(0, impl=key_impl))
  with sharding.activate(mesh, rules):
    jaxpr, boxed = jax.make_jaxpr(init, return_shape=True)(rng, example_specs)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    shardings = _fill_replicated(shardings, mesh)
  is_box = lambda x: isinstance(x, nn.Partitioned)
  abstract = jax.tree.map(lambda x: x.value if is_box(x) else x, boxed, is_leaf=is_box)
  shardings = jax.tree.map(_whole_where_indivisible, abstract, shardings)
  treedef = jax.tree.structure(abstract)  # the boxes' leaves are their values, in this order
  replay = jaxpr_as_fun(jaxpr)

  def unboxed_init(rng):
    # The model's forward pass in the trace only builds the params; XLA drops it with these zeros.
    zeros = [jnp.zeros(s.shape, s.dtype) for s in jax.tree.leaves(example_specs)]
    return jax.tree.unflatten(treedef, replay(rng, *zeros))

  on_cpu = mesh.devices.flat[0].platform == "cpu"
  options = RUN_ONCE_CPU_COMPILER_OPTIONS if on_cpu else None
  return (
    abstract,
    shardings,
    jax.jit(unboxed_init, out_shardings=shardings, compiler_options=options),
  )


def state_layout(init, example_specs, mesh, rules):
  """The train state's shapes and shardings from one trace of `init`: nothing is allocated."""
  abstract, shardings, _ = traced_init(init, example_specs, mesh, rules)
  return abstract, shardings


def _whole_where_indivisible(leaf, leaf_sharding):
  """A dimension the rules split over more devices than its size divides stays whole.

  Rules name axes, not sizes: `fsdp` splits every embedding and channel axis over the data
  devices, and an RGB stem's 3 input channels do not divide by 8. Validation already holds the
  axes a config must split evenly (vocab, heads, experts) to their sizes.
  """
  spec = leaf_sharding.spec
  if not spec:
    return leaf_sharding
  mesh = leaf_sharding.mesh
  entries = []
  for size, axes in zip(leaf.shape, tuple(spec) + (None,) * (len(leaf.shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    entries.append(axes if size % ways == 0 else None)
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*entries))


def _fill_replicated(shardings, mesh):
  """Leaves without logical names (counters, Adam's step count) are replicated."""
  return jax.tree.map(
    lambda s: s if isinstance(s, jax.sharding.Sharding) else sharding.replicated(mesh),
    shardings,
    is_leaf=lambda s: s is None or isinstance(s, jax.sharding.Sharding),
  )


def step_batch_specs(config, tasks, batch_sizes: dict[str, int]):
  """(plan, each group's batch as shapes): the step's input, known from the config alone."""
  task_specs = {
    name: grouping.batch_specs(layout.example_shapes(config, task), batch_sizes[name])
    for name, task in tasks.items()
  }
  plan = grouping.plan_groups({n: t.signature for n, t in tasks.items()}, task_specs)
  return plan, grouping.merge_specs(plan, task_specs)


def check_batch_shapes(batches, specs, process_count: int) -> None:
  """The pipeline's batches against the shapes the step was compiled for (a bug if they differ)."""
  for group, batch in batches.items():
    for key, spec in specs[group].items():
      want = (spec.shape[0] // process_count, *spec.shape[1:])
      got = np.shape(batch[key])
      if got != want:
        raise ValueError(
          f"batch {group}/{key} has shape {got}, the compiled step expects {want} "
          "(layout.example_shapes and the pipeline disagree)"
        )
