"""The cost of the per-task expert load statistics inside the train step, taken turn about.

  nice python bench/expert_load.py [--config=configs/multimodel.py[:variant]] [--config.x=y ...]
      [--rounds=8] [--steps=5]

One process compiles the default train step twice, with config.train.expert_load on and off, on
the same first batch of the mixture; then, in each round, it times `steps` steps of one and
`steps` of the other (which goes first alternates). Each step is timed until its new state and
metrics exist. The cost is the median step with the statistics over the median step without,
minus 1; the goal is at most 2%. Writes bench/results/expert_load.md (MM_JAX_BENCH_RESULTS_DIR
moves it).
"""

import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

if __name__ == "__main__":  # the trainer's malloc (mm_jax/main.py), so the step times match it
  from mm_jax import memory

  memory.restart_with_tuned_malloc()

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bench import results  # noqa: E402
from mm_jax import grouping, sharding  # noqa: E402
from mm_jax import run as run_lib  # noqa: E402
from mm_jax.data import pipeline  # noqa: E402

FLAGS = flags.FLAGS
GOAL = 0.02  # the statistics may cost at most this share of the step


def _define_flags():
  config_flags.DEFINE_config_file("config", os.path.join(_REPO, "configs", "multimodel.py"))
  flags.DEFINE_integer("rounds", 8, "rounds, each timing both steps")
  flags.DEFINE_integer("steps", 5, "steps of each variant per round")


def compiled_steps(config):
  """{True: step with the statistics, False: without}, the first batch and an initial state."""
  runs = {}
  for on in (True, False):
    variant = config.copy_and_resolve_references()
    variant.train.expert_load = on
    runs[on] = run_lib.build(variant)
  run = runs[True]
  pipeline.ensure_prepared(config)
  reader = pipeline.TrainIterator(config, tasks=run.tasks, read_layout=run.read_layout(0, 1))
  batches = sharding.global_batch(grouping.merge_batches(run.plan, next(reader)), run.mesh)
  rng = jax.random.key(config.seed)
  state = run.init_state()
  steps = {}
  for on, variant_run in runs.items():
    with variant_run.activate():
      steps[on] = variant_run.jit_step().lower(state, batches, rng).compile()
  return runs, steps, batches, state, rng


def main(argv):
  del argv
  config = FLAGS.config
  runs, steps, batches, state, rng = compiled_steps(config)
  times = {True: [], False: []}

  def timed(on: bool, count: int, record: bool):
    nonlocal state
    with runs[on].activate():
      for _ in range(count):
        start = time.perf_counter()
        state, metrics = jax.block_until_ready(steps[on](state, batches, rng))
        if record:
          times[on].append(time.perf_counter() - start)
    return metrics

  for on in (True, False):  # warm-up: first runs, allocator growth
    metrics = timed(on, 2, record=False)
  scalars = sum(name.startswith("moe/") for name in timed(True, 1, record=False))
  del metrics
  for round_index in range(FLAGS.rounds):
    for on in (True, False) if round_index % 2 == 0 else (False, True):
      timed(on, FLAGS.steps, record=True)
  with_stats, without = (statistics.median(times[on]) for on in (True, False))
  cost = with_stats / without - 1.0
  lines = [
    f"per-task expert load inside the train step: {FLAGS.rounds} rounds x {FLAGS.steps} steps "
    "each, turn about",
    f"config: {config.data.tasks.count(',') + 1} tasks, d={config.model.d}, "
    f"{config.model.moe.num_experts} experts, {config.data.global_batch_size} examples a step, "
    f"{scalars} expert load scalars a step",
    "",
    "| step | median s | min s | max s |",
    "|---|---:|---:|---:|",
  ]
  for on, name in ((False, "without the statistics"), (True, "with the statistics")):
    lines.append(
      f"| {name} | {statistics.median(times[on]):.4f} | {min(times[on]):.4f} | "
      f"{max(times[on]):.4f} |"
    )
  lines += ["", f"cost: {100 * cost:+.2f}% of the step (goal <= {100 * GOAL:.0f}%): "]
  lines[-1] += "met" if cost <= GOAL else "NOT met"
  text = "\n".join(lines)
  print(text, flush=True)
  print(f"wrote {os.path.relpath(results.write('expert_load', text))}", flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
