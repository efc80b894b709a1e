"""The training loop, top to bottom: run -> checkpoint check -> step compile -> data -> state ->
loop (step, report, checkpoint, evaluate).

What a config decides (mesh, tasks, model, optimizer, shardings) comes from the run builder
(run.py); what one step computes from step.py. This module only drives them.
"""

import concurrent.futures
import os
import signal
import threading
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from mm_jax import checkpointing, console, grouping, memory, mixture, sharding, validation
from mm_jax import run as run_lib
from mm_jax import step as step_lib


class Preempted(RuntimeError):
  """SIGTERM arrived: a checkpoint of the current step was written before this was raised."""


class _TerminationFlag:
  """Turns SIGTERM into a flag the loop checks between steps (a save mid-step is unsafe)."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      # A SIGTERM recorded before the loop began (mm_jax/main.py's handler) counts as raised.
      self.raised = bool(getattr(self._previous, "received", False))
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _on_any_process(flag: bool) -> bool:
  """SIGTERM can reach a pod's hosts at different steps; all stop (and save) at the same one."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


class NonFiniteError(RuntimeError):
  """Raised after `config.train.max_consecutive_nonfinite` skipped updates in a row."""


def compile_in_background(jitted, args, run) -> concurrent.futures.Future:
  """Lowers `jitted` for `args` here, compiles it on a worker thread: (compiled, seconds) later.

  Tracing and lowering are Python and hold the GIL; XLA's compile releases it. Lowered on the
  worker, the default step shared the GIL with the data pipeline's set-up (9.5 s, against 5.6-6.9 s
  lowered here first), and its compile started that much later (docs/performance.md).
  """
  start = time.time()
  with run.activate():
    lowered = jitted.lower(*args)
  logging.info("train step traced and lowered in %.1f s", time.time() - start)

  def compile_lowered():
    return lowered.compile(), time.time() - start

  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile")
  future = pool.submit(compile_lowered)
  pool.shutdown(wait=False)  # the thread ends with its one task
  return future


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
  """Trains, evaluates and checkpoints.

  Returns {"eval": final metrics per task, "train": [(step, logged train metrics), ...]}.
  `devices` (default: all) lets tests run the same config on a sub-mesh.
  """
  # ------------------------------------------------------------------ the run, the workdir
  run = run_lib.build(config, devices)
  validation.check_workdir(workdir)
  is_chief = jax.process_index() == 0
  logging.info("mesh %s over %d devices", dict(run.mesh.shape), run.mesh.size)
  logging.info("task groups: %s", [(g.name, g.tasks) for g in run.plan])

  # Checkpoints this config cannot continue (another model, other data settings) are a config
  # error, found before compiling; they stay as they are.
  ckpt = checkpointing.Checkpointer(
    os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints
  )
  ckpt.check_matches(run.abstract_state)
  read_layout = run.read_layout(jax.process_index(), jax.process_count())
  saved_position = ckpt.newest_data_state()
  if saved_position is not None:
    read_layout.check(saved_position)

  # The step's shapes follow from the config, so it is lowered now and compiles on a worker thread
  # (XLA releases the GIL) while the data is read and the state restored or initialised. A run
  # resumed at its end (the command rerun after it finished) only evaluates: no step to compile.
  num_steps = config.train.num_steps
  rng = jax.random.key(config.seed)
  jit_step = run.jit_step()
  step_args = (run.abstract_state, run.batch_specs, rng)
  saved_steps = ckpt.steps()
  finished = bool(saved_steps) and saved_steps[-1] >= num_steps
  step_compile = None if finished else compile_in_background(jit_step, step_args, run)

  # ------------------------------------------------------------------ logs, data
  # TensorFlow and what needs it (the input pipeline, evaluation, clu's writers) load only now:
  # their imports, ~6 s of Python, run beside the step's compile instead of before it.
  start = time.time()
  from clu import metric_writers

  from mm_jax import evaluate
  from mm_jax.data import pipeline

  logging.info("TensorFlow, the pipeline and clu imported in %.1f s", time.time() - start)

  # Only now: a run stopped above must not replace the config its workdir's checkpoints came from.
  # Scalars go to TensorBoard only; the console gets one progress line per report.
  writers = [metric_writers.SummaryWriter(workdir)] if is_chief else []
  writer = metric_writers.AsyncMultiWriter(writers)
  writer.write_hparams(_flat_hparams(config))
  if is_chief:  # python -m mm_jax.evaluate / predict / gallery read the run's config from here
    epath.Path(workdir, "config.json").write_text(config.to_json_best_effort(indent=2))
  train_iter = pipeline.TrainIterator(config, tasks=run.tasks, read_layout=read_layout)
  pipeline.ensure_prepared(config)
  if is_chief:  # each task's share of a step, as config.data.mixing sets it
    print(mixture.describe(config, run.tasks, run.batch_sizes) + "\n", flush=True)
  first = grouping.merge_batches(run.plan, next(train_iter))  # also the first step's batch
  step_lib.check_batch_shapes(first, run.batch_specs, jax.process_count())
  logging.info("first batch read")

  # ------------------------------------------------------------------ checkpoint: resume or init
  restored = ckpt.restore_latest(run.sharded_state_specs())
  if restored is None:
    state = run.init_state()
    start_step, pending = 0, first
  else:
    start_step, state, data_state = restored
    train_iter.set_state(data_state)
    pending = None
    logging.info("resumed from step %d", start_step)
  logging.info("parameters: %s", f"{run.num_params:,}")

  # ------------------------------------------------------------------ the step
  if start_step < num_steps:  # (fell back past a finished checkpoint: compile after all)
    step_compile = step_compile or compile_in_background(jit_step, step_args, run)
    compiled_step, compile_seconds = step_compile.result()
    memory.release_freed_memory()  # the compiler's scratch: GBs that malloc would keep
    logging.info("train step compiled in %.1f s", compile_seconds)
  else:
    logging.info(
      "step %d reaches config.train.num_steps=%d: evaluating only", start_step, num_steps
    )
  evaluator = None

  def evaluate_and_log(step, params):
    """Held-out metrics at `step`, decoded at the end, printed as one table. The evaluator is
    built at the first call: reading the held-out batches need not delay the first step."""
    nonlocal evaluator
    start = time.monotonic()
    evaluator = evaluator or evaluate.Evaluator(run, train_iter.tokenizer)
    metrics = evaluator.evaluate(params, decode=step >= num_steps)
    memory.release_freed_memory()  # the evaluation programs' compile scratch
    writer.write_scalars(step, evaluator.flatten(metrics) | evaluator.expert_load(metrics))
    if is_chief and metrics:
      seconds = time.monotonic() - start
      kind = "decoded" if step >= num_steps else "teacher-forced"
      print(f"\nheld-out at step {step} ({kind}, {seconds:.0f} s):", flush=True)
      print(evaluator.table(metrics) + "\n", flush=True)
    return metrics

  # ------------------------------------------------------------------ the loop
  progress = console.Progress(start_step, num_steps)
  train_metrics, history = [], []
  step = start_step
  final_metrics = {}
  t_start = time.time()
  # Leaving this block, even by an error, lets the pending checkpoint save finish.
  with _TerminationFlag() as termination, ckpt:
    while step < num_steps:
      if _on_any_process(termination.raised):
        ckpt.save(step, state, train_iter.get_state(), force=True)
        ckpt.wait()
        writer.flush()
        raise Preempted(f"SIGTERM at step {step}: checkpoint saved in {ckpt.directory}")
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        if config.train.fixed_batch:
          merged = first
        elif pending is not None:
          merged, pending = pending, None
        else:
          merged = grouping.merge_batches(run.plan, next(train_iter))
        batches = sharding.global_batch(merged, run.mesh)
        state, metrics = compiled_step(state, batches, rng)
      step += 1
      if step == start_step + 1:  # waits for it: dispatch returns before the step has run
        jax.block_until_ready(metrics)
        logging.info("first step done %.1f s after the loop started", time.time() - t_start)
        memory.purge_freed_memory_at_once()  # start-up is over: bound the steps' memory
      train_metrics.append(metrics)
      if step % config.train.log_every == 0 or step == num_steps:
        summary = _mean_metrics(train_metrics)
        streak = int(state.nonfinite_streak)
        summary["nonfinite_skipped_total"] = float(state.nonfinite_total)
        for task, counts in train_iter.counters().items():
          summary.update({f"data/{task}/{k}": float(v) for k, v in counts.items()})
        line, steps_per_second = progress.report(step, summary["loss"])
        summary["steps_per_second"] = steps_per_second
        writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
        if is_chief:
          print(line, flush=True)
        history.append((step, summary))
        train_metrics = []
        if streak >= config.train.max_consecutive_nonfinite:
          ckpt.wait()
          writer.flush()  # the asynchronous writer would drop the scalars that explain the stop
          raise NonFiniteError(
            f"{streak} consecutive steps had non-finite loss or gradients (updates skipped); "
            f"last good checkpoint: step {ckpt.steps()[-1] if ckpt.steps() else 'none'} in "
            f"{ckpt.directory}: lower config.optimizer.learning_rate or check the data"
          )
      checkpoint_due = step % config.train.checkpoint_every == 0 or step == num_steps
      if checkpoint_due and int(state.nonfinite_streak) == 0:
        ckpt.save(step, state, train_iter.get_state())
      if step % config.train.eval_every == 0 or step == num_steps:
        eval_start = time.monotonic()
        final_metrics = evaluate_and_log(step, state.params)
        progress.exclude(time.monotonic() - eval_start)
  if start_step >= num_steps:  # resumed at its end: the loop evaluated nothing, so do it now
    final_metrics = evaluate_and_log(step, state.params)
  writer.flush()
  return {"eval": final_metrics, "train": history}


def _mean_metrics(metrics_list):
  stacked = jax.device_get(metrics_list)
  return {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}


def _flat_hparams(config):
  flat = {}

  def visit(prefix, node):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, ml_collections.ConfigDict):
        visit(name + ".", value)
      elif isinstance(value, int | float | str | bool):
        flat[name] = value
      else:
        flat[name] = str(value)

  visit("", config)
  return flat
