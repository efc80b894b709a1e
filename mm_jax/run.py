"""The run builder: everything a config decides about a run, built once and passed down.

  config -> validated -> mesh, rules -> tasks, batch sizes -> plan, batch specs -> model,
  optimizer -> abstract train state and its shardings -> the jitted init and train step

The training loop (train.py), ahead-of-time compilation (aot.py), prediction and evaluation
(predict.py, evaluate.py, gallery.py) and the benches start from `build`; none of them writes this
sequence out again. Nothing here reads data or allocates the state: the step's shapes follow from
the config alone, so it can be lowered (and compiled for another machine) before any data exists.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from mm_jax import mixture, optimizer, sharding, step, validation
from mm_jax.data import layout
from mm_jax.models.multimodel import MultiModel


@dataclasses.dataclass(frozen=True)
class Run:
  """One run's static parts. `config` is the validated config they were built from."""

  config: ml_collections.ConfigDict
  mesh: Mesh
  rules: tuple
  tasks: dict  # name -> data.tasks.Task, in config.data.tasks order
  batch_sizes: dict[str, int]  # global examples per step, per task
  plan: tuple  # grouping.Group per task group
  batch_specs: dict  # group -> {key: ShapeDtypeStruct}: one step's global batch
  model: MultiModel
  tx: Any  # optax.GradientTransformation
  abstract_state: step.TrainState  # ShapeDtypeStructs: nothing allocated
  state_shardings: Any
  batch_shardings: Any
  init: Any  # jitted: key -> the initial TrainState, written straight to its shardings

  @property
  def data_parallel(self) -> int:
    return sharding.data_parallel_size(self.mesh)

  @property
  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.abstract_state.params))

  def activate(self):
    """The mesh and rules to trace and run the run's programs under."""
    return sharding.activate(self.mesh, self.rules)

  def init_key(self) -> jax.Array:
    return step.init_key(self.config)

  def init_state(self) -> step.TrainState:
    with self.activate():
      return self.init(self.init_key())

  def jit_step(self):
    """The jitted train step, with this run's shardings (not yet traced)."""
    return step.jit_train_step(
      self.config,
      self.model,
      self.tx,
      self.plan,
      self.mesh,
      self.state_shardings,
      self.batch_shardings,
    )

  def sharded_state_specs(self):
    """The abstract state with each leaf's sharding: what a restore or an AOT lowering takes."""
    return with_shardings(self.abstract_state, self.state_shardings)

  def sharded_batch_specs(self):
    return with_shardings(self.batch_specs, self.batch_shardings)

  def read_layout(self, process_index: int, process_count: int) -> layout.ReadLayout:
    """What this process reads each step (and which saved data positions it can continue)."""
    return layout.read_layout(
      self.config,
      mixture.local_batch_sizes(self.config, self.data_parallel, process_count),
      process_index,
      process_count,
    )


def with_shardings(tree, shardings):
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def model_config(
  model: ml_collections.ConfigDict, platform: str
) -> ml_collections.FrozenConfigDict:
  """config.model as the model takes it on devices of `platform` ("cpu", "tpu", "gpu"): its
  "auto" fields decided, the rest as they are.

  kernels "auto": the forms written for XLA:CPU on CPUs, plain dots with shifted depthwise
  convs on TPUs, XLA's plain forms elsewhere (models/blocks.py, KERNELS). dtype
  "auto": float32 activations on CPUs, bfloat16 elsewhere
  (parameters, optimizer state, softmax, router and losses stay float32 either way).
  """
  on_cpu = platform == "cpu"
  resolved = model.copy_and_resolve_references()
  if resolved.kernels == "auto":
    resolved.kernels = {"cpu": "cpu", "tpu": "tpu"}.get(platform, "xla")
  if resolved.dtype == "auto":
    resolved.dtype = "float32" if on_cpu else "bfloat16"
  return ml_collections.FrozenConfigDict(resolved)


def build(
  config: ml_collections.ConfigDict,
  devices: Sequence[jax.Device] | None = None,
  *,
  mesh: Mesh | None = None,
  rows_per_shard: int | None = None,
  check_data: bool = True,
) -> Run:
  """Validates `config` (ConfigError, one line) and builds its run.

  `devices` (default: all) or a ready `mesh` (aot.py's TPU slices) place the run.
  `rows_per_shard` replaces the config's per-task batch sizes by that many rows per data-parallel
  shard: inference needs the parameters' shapes, which no batch size changes. `check_data=False`
  skips looking for the datasets on disk (ahead-of-time compilation reads none).
  """
  if mesh is None:
    devices = list(jax.devices() if devices is None else devices)
    validation.validate(config, num_devices=len(devices), check_data=check_data)
    mesh = sharding.make_mesh(config.mesh, devices)
  else:
    validation.validate(config, num_devices=mesh.size, check_data=check_data)
  rules = sharding.config_rules(config)
  tasks = layout.build_tasks(config)
  data_parallel = sharding.data_parallel_size(mesh)
  if rows_per_shard is None:
    batch_sizes = mixture.task_batch_sizes(config, data_parallel)
  else:
    batch_sizes = dict.fromkeys(tasks, rows_per_shard * data_parallel)
  plan, batch_specs = step.step_batch_specs(config, tasks, batch_sizes)
  # The one place "auto" kernels and dtype are decided: by the devices the run is placed on
  # (for aot.py's TPU slices, TPUs, though this process runs on a CPU).
  model = MultiModel(model_config(config.model, mesh.devices.flat[0].platform))
  tx = optimizer.make_optimizer(config.optimizer, config.train.num_steps)
  init = functools.partial(step.init_state, model=model, tx=tx, plan=plan)
  abstract_state, state_shardings, jit_init = step.traced_init(
    init, batch_specs, mesh, rules, step.init_prng_impl(config)
  )
  batch_shardings = jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim), batch_specs)
  return Run(
    config=config,
    mesh=mesh,
    rules=rules,
    tasks=tasks,
    batch_sizes=batch_sizes,
    plan=plan,
    batch_specs=batch_specs,
    model=model,
    tx=tx,
    abstract_state=abstract_state,
    state_shardings=state_shardings,
    batch_shardings=batch_shardings,
    init=jit_init,
  )
