"""Speed and memory of the default training run, and input vs step: one table.

  nice python bench/train.py [--config=configs/multimodel.py[:variant]] [--config.x=y ...]
      [--steps=10] [--startup_steps=2] [--startup_eval_batches=N] [--input_batches=20]
      [--skip_startup]

About 10 minutes on 2 cores (the trainer subprocess is most of it; --skip_startup drops it).
Every timing is a ratio against a baseline measured in the same run:
- MFU: analytic model FLOPs of one train step (mm_jax/models/flops.py: every modality net, body,
  decoder and softmax of every task group, at the batch's padded shapes; backward = 2x forward) /
  the median of real step times (each step blocked until its outputs are ready) / the float32
  matmul peak, measured before and after the steps (the higher is used, so MFU is not inflated).
- Time to first step: the real trainer (`python -m mm_jax.main`) in a fresh subprocess with an
  empty compilation cache, split at its log lines; each piece / the total. Also its CPU-seconds
  through the first step / that wall time (cores in use). The embedded data must already be built
  (~/.cache/mm_jax): its one-time build is not part of this time.
- Peak resident memory: the same subprocess's VmHWM after the first step and ru_maxrss at its end
  (after the final evaluation with decoding), / the 6 GB budget (GB = 1e9 bytes).
- Input vs step: examples/s the TrainIterator delivers for the whole mixture / examples/s the
  train step consumes, each measured alone (on a shared 2-core machine they also compete).
The in-process trainer then compiles the same step with the subprocess's compilation cache, so its
start-up pieces (trace + lower, compile or cache load, run) show what a warm cache would give.
"""

import dataclasses
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

if __name__ == "__main__":  # the trainer's malloc (mm_jax/main.py), so the step times match it
  from mm_jax import memory

  memory.restart_with_tuned_malloc()

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bench import input as input_bench  # noqa: E402
from bench import model as model_bench  # noqa: E402
from mm_jax import grouping, sharding  # noqa: E402
from mm_jax import run as run_lib  # noqa: E402
from mm_jax import step as step_lib  # noqa: E402
from mm_jax.data import pipeline  # noqa: E402
from mm_jax.models.flops import step_macs, train_flops  # noqa: E402

_DEFAULT_CONFIG = os.path.join(_REPO, "configs", "multimodel.py")
FLAGS = flags.FLAGS


def _define_flags():
  """Only when run as a script: bench/input.py imports this module for its step timing."""
  config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file (as main.py).")
  flags.DEFINE_integer("steps", 10, "Timed train steps (after the compiling one).")
  flags.DEFINE_integer("startup_steps", 2, "Steps of the trainer subprocess.")
  flags.DEFINE_integer(
    "startup_eval_batches", None, "Held-out batches per task in the subprocess (default: config's)."
  )
  flags.DEFINE_integer("startup_timeout", 1500, "Seconds before the subprocess is killed.")
  flags.DEFINE_bool("skip_startup", False, "No subprocess: MFU and input only.")
  flags.DEFINE_integer("input_batches", 20, "Mixture batches timed.")
  flags.DEFINE_integer("peak_n", 4096, "Side of the square matmul for the peak.")
  flags.DEFINE_integer("peak_repeats", 3, "Timed matmuls per peak measurement.")


MEMORY_BUDGET_BYTES = 6e9
FIRST_STEP_GOAL_S = 60.0
MFU_GOAL = 0.35
INPUT_GOAL = 1.0  # the input must never be the bottleneck (3x headroom is the aim)

# Trainer log lines that end each start-up piece (mm_jax/main.py and mm_jax/train.py).
_MARKERS = (
  ("imports (python, jax, mm_jax)", "devices:"),
  ("init trace, train step trace + lower", "train step traced and lowered in"),
  ("TF + clu imports (the step compiles meanwhile)", "TensorFlow, the pipeline and clu imported"),
  ("data ready (the step compiles meanwhile)", "first batch read"),
  ("init compile + run (the step compiles meanwhile)", "parameters:"),
  ("train step compile (the part not overlapped)", "train step compiled in"),
)
_FIRST_STEP = re.compile(r"first step done ([0-9.]+) s after the loop started")


# ---------------------------------------------------------------------------- the real trainer


@dataclasses.dataclass
class TrainerRun:
  returncode: int
  total_s: float  # start to the end of the first step
  wall_s: float  # the whole run, final evaluation included
  pieces: dict[str, float]  # start-up piece -> seconds; empty if the first step never finished
  peak_first_step_bytes: int
  peak_bytes: int
  tail: list[str]
  # CPU-seconds (user + system, all threads) through the first step: start-up is CPU-bound on
  # 2 cores, and this swings less than wall time when other work shares the machine.
  cpu_first_step_s: float = 0.0


def _high_water_bytes(pid: int) -> int:
  """VmHWM: the process's peak resident set so far."""
  try:
    with open(f"/proc/{pid}/status") as status:
      for line in status:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def _cpu_seconds(pid: int) -> float:
  """utime + stime of a live process (0.0 where /proc is missing)."""
  try:
    with open(f"/proc/{pid}/stat") as stat:
      fields = stat.read().rsplit(")", 1)[1].split()
  except OSError:
    return 0.0
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def config_args(argv) -> list[str]:
  """The --config and --config.x=y flags of a command line, for the trainer to see the same.

  Only the --flag=value form (a separate value would be lost).
  """
  args = [a for a in argv[1:] if a.startswith(("--config=", "--config."))]
  if not any(a.startswith("--config=") for a in args):
    args.insert(0, f"--config={_DEFAULT_CONFIG}")
  return args


def run_trainer(args, *, steps, eval_batches, cache_dir, timeout) -> TrainerRun:
  """`python -m mm_jax.main` for `steps` steps; times its start-up from its log lines."""
  with tempfile.TemporaryDirectory(prefix="bench_train_") as workdir:
    return _run_trainer_in(workdir, args, steps, eval_batches, cache_dir, timeout)


def _run_trainer_in(workdir, args, steps, eval_batches, cache_dir, timeout) -> TrainerRun:
  command = [
    sys.executable,
    "-m",
    "mm_jax.main",
    *args,
    f"--workdir={workdir}",
    f"--config.train.num_steps={steps}",
  ]
  if eval_batches is not None:
    command.append(f"--config.train.eval_batches={eval_batches}")
  path = os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH")) if p)
  env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=cache_dir)
  start = time.perf_counter()
  proc = subprocess.Popen(
    command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  watchdog = threading.Timer(timeout, proc.kill)
  watchdog.start()
  ends, first_step_s, peak_first_step, cpu_first_step, tail = {}, None, 0, 0.0, []
  for line in proc.stdout:
    now = time.perf_counter() - start
    tail = (tail + [line.rstrip()])[-15:]
    for piece, marker in _MARKERS:
      if piece not in ends and marker in line:
        ends[piece] = now
    found = _FIRST_STEP.search(line)
    if found and first_step_s is None:
      first_step_s, ends["first step"] = float(found.group(1)), now
      peak_first_step = _high_water_bytes(proc.pid)
      cpu_first_step = _cpu_seconds(proc.pid)
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  watchdog.cancel()
  total = ends.get("first step", time.perf_counter() - start)
  return TrainerRun(
    returncode=proc.returncode,
    total_s=total,
    wall_s=time.perf_counter() - start,
    pieces=_pieces(ends, first_step_s) if first_step_s is not None else {},
    peak_first_step_bytes=peak_first_step,
    peak_bytes=usage.ru_maxrss * 1024,
    tail=tail,
    cpu_first_step_s=cpu_first_step,
  )


def _pieces(ends: dict[str, float], first_step_s: float) -> dict[str, float]:
  """Consecutive differences of the marker times; the loop's own first-step time is split off."""
  pieces, previous = {}, 0.0
  for piece, _ in _MARKERS:
    pieces[piece] = ends[piece] - previous
    previous = ends[piece]
  loop_start = ends["first step"] - first_step_s
  pieces["compiled step to loop start"] = loop_start - previous
  pieces["first step run"] = first_step_s
  return pieces


# ---------------------------------------------------------------------------- the step, in process


@dataclasses.dataclass
class InProcessTrainer:
  """What train.train_and_evaluate builds before its loop, and how long each piece took."""

  run: run_lib.Run
  train_iter: pipeline.TrainIterator
  batches: dict  # the first step's merged task-group batches, on device
  state: step_lib.TrainState
  step: jax.stages.Compiled  # the jitted train step, compiled for these batches
  rng: jax.Array
  seconds: dict[str, float]

  @property
  def plan(self) -> tuple:
    return self.run.plan


_HIT = "/jax/compilation_cache/cache_hits"
_RETRIEVAL = "/jax/compilation_cache/cache_retrieval_time_sec"


class _CacheEvents:
  """JAX's compilation-cache events (hit counts, seconds reading) recorded inside `with`."""

  _active: "_CacheEvents | None" = None
  _registered = False

  def __init__(self):
    self.totals: dict[str, float] = {}

  @classmethod
  def _record(cls, event: str, amount: float = 1.0, **kwargs):
    del kwargs
    if cls._active is not None:
      cls._active.totals[event] = cls._active.totals.get(event, 0.0) + amount

  def __enter__(self):
    if not _CacheEvents._registered:
      jax.monitoring.register_event_listener(_CacheEvents._record)
      jax.monitoring.register_event_duration_secs_listener(_CacheEvents._record)
      _CacheEvents._registered = True
    _CacheEvents._active = self
    return self.totals

  def __exit__(self, *exc):
    _CacheEvents._active = None


def start_trainer(config) -> InProcessTrainer:
  """train.train_and_evaluate's calls up to its first step, one after another so that each piece
  is timed alone (the trainer compiles the step on a worker thread while it reads data and
  initialises)."""
  seconds = {}
  start = time.perf_counter()
  run = run_lib.build(config)
  seconds["run built (config checked, init traced)"] = time.perf_counter() - start

  start = time.perf_counter()
  pipeline.ensure_prepared(config)
  train_iter = pipeline.TrainIterator(config, tasks=run.tasks, read_layout=run.read_layout(0, 1))
  example = grouping.merge_batches(run.plan, next(train_iter))
  step_lib.check_batch_shapes(example, run.batch_specs, 1)
  seconds["data ready (first batch of every task)"] = time.perf_counter() - start

  start = time.perf_counter()
  rng = jax.random.key(config.seed)
  batches = sharding.global_batch(example, run.mesh)
  state = jax.block_until_ready(run.init_state())
  seconds["init compile + run"] = time.perf_counter() - start

  step = run.jit_step()
  with run.activate():
    start = time.perf_counter()
    lowered = step.lower(state, batches, rng)
    seconds["first step: trace + lower"] = time.perf_counter() - start
    start = time.perf_counter()
    with _CacheEvents() as events:
      compiled = lowered.compile()
    hit = _HIT in events
    seconds[f"first step: XLA compile ({'cache hit' if hit else 'no cache hit'})"] = (
      time.perf_counter() - start
    )
    if hit:
      seconds["  of which reading the cached executable"] = events[_RETRIEVAL]
    start = time.perf_counter()
    state = jax.block_until_ready(compiled(state, batches, rng))[0]
    seconds["first step: run"] = time.perf_counter() - start
  return InProcessTrainer(run, train_iter, batches, state, compiled, rng, seconds)


def step_seconds(trainer: InProcessTrainer, steps: int) -> list[float]:
  """Wall time of each step until its new state and metrics exist (not the dispatch rate)."""
  times = []
  with trainer.run.activate():
    for _ in range(steps):
      start = time.perf_counter()
      trainer.state, metrics = jax.block_until_ready(
        trainer.step(trainer.state, trainer.batches, trainer.rng)
      )
      times.append(time.perf_counter() - start)
  del metrics
  return times


def examples_per_step(trainer: InProcessTrainer) -> int:
  return sum(trainer.train_iter.batch_sizes.values())


def xla_step_flops(trainer: InProcessTrainer) -> float:
  """XLA's own count, printed beside the analytic one (it over-counts depthwise convs on CPU)."""
  cost = trainer.step.cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


# ---------------------------------------------------------------------------- the table


def _row(name, value="", baseline="", ratio="", goal="", met=""):
  print(f"{name:<46}{value:>14}  {baseline:<26}{ratio:>8}  {goal:<14}{met}")


def _met(ok: bool) -> str:
  return "yes" if ok else "NO"


def _mfu_rows(trainer, macs, times, peak):
  step_s = statistics.median(times)
  step_flops = train_flops(sum(macs.values()))
  mfu = step_flops / step_s / peak
  xla_flops = xla_step_flops(trainer)
  _row("MFU of the train step")
  _row("  model FLOPs per step (analytic)", f"{step_flops / 1e9:.2f} GFLOP")
  _row(
    "  XLA cost-analysis FLOPs (not used)",
    f"{xla_flops / 1e9:.2f} GFLOP",
    "analytic",
    f"{xla_flops / step_flops:.2f}",
  )
  _row(
    f"  step time (median of {len(times)})", f"{step_s:.3f} s", f"matmul {peak / 1e9:.1f} GFLOP/s"
  )
  _row(
    "  MFU = FLOPs / step time / peak", "", "", f"{100 * mfu:.1f}%", ">= 35%", _met(mfu >= MFU_GOAL)
  )


def _startup_rows(run: TrainerRun):
  _row("Start to first step (fresh subprocess)", "", f"rc {run.returncode}")
  for piece, s in run.pieces.items():
    _row(f"  {piece}", f"{s:.1f} s", f"total {run.total_s:.1f} s", f"{s / run.total_s:.2f}")
  ratio = run.total_s / FIRST_STEP_GOAL_S
  _row(
    "  total",
    f"{run.total_s:.1f} s",
    f"goal {FIRST_STEP_GOAL_S:.0f} s",
    f"{ratio:.2f}",
    "<= 1",
    _met(bool(run.pieces) and ratio <= 1),
  )
  _row(
    "  CPU time through the first step (all threads)",
    f"{run.cpu_first_step_s:.1f} CPU-s",
    f"total {run.total_s:.1f} s",
    f"{run.cpu_first_step_s / run.total_s:.2f} cores",
  )
  _row("  (the whole subprocess, final eval included)", f"{run.wall_s:.1f} s")


def _memory_rows(run: TrainerRun):
  _row("Peak resident memory (subprocess, ru_maxrss)")
  for label, used in (
    ("  through the first step", run.peak_first_step_bytes),
    ("  whole run (steps, final eval with decoding)", run.peak_bytes),
  ):
    ratio = used / MEMORY_BUDGET_BYTES
    _row(label, f"{used / 1e9:.2f} GB", "budget 6 GB", f"{ratio:.2f}", "<= 1", _met(ratio <= 1))


def _input_rows(trainer, times, input_rate):
  step_rate = examples_per_step(trainer) / statistics.median(times)
  ratio = input_rate / step_rate
  _row("Input pipeline vs train step (whole mixture)")
  _row(
    "  TrainIterator examples/s",
    f"{input_rate:.0f} ex/s",
    f"step {step_rate:.1f} ex/s",
    f"{ratio:.1f}",
    ">= 1 (aim: 3)",
    _met(ratio >= INPUT_GOAL),
  )


def _details(trainer, macs, cache_warm: bool):
  warm = "compile cache warm from the subprocess" if cache_warm else "cold compile cache"
  print(f"\nIn-process start-up ({warm}; imports already done):")
  for piece, s in trainer.seconds.items():
    print(f"  {piece:<44}{s:>8.1f} s")
  total = sum(macs.values())
  print("\nAnalytic forward multiply-adds per task group (padded shapes):")
  for group in trainer.plan:
    batch = trainer.batches[group.name]
    shapes = {k: batch[k].shape for k in ("inputs", "targets")}
    print(f"  {group.name:<24}{100 * macs[group.name] / total:>6.1f}%  {shapes}")


def main(argv):
  del argv  # absl passes only what its flags left over; the trainer gets sys.argv's --config flags
  logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  print(
    f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform}, "
    f"{os.cpu_count()} CPUs, {' '.join(config_args(sys.argv))}"
  )
  with tempfile.TemporaryDirectory(prefix="bench_train_jit_cache_") as cache_dir:
    run = None
    if not FLAGS.skip_startup:
      run = run_trainer(
        config_args(sys.argv),
        steps=FLAGS.startup_steps,
        eval_batches=FLAGS.startup_eval_batches,
        cache_dir=cache_dir,
        timeout=FLAGS.startup_timeout,
      )
      if run.returncode != 0 or not run.pieces:
        print(f"trainer subprocess failed (rc {run.returncode}); its last lines:")
        print("\n".join(run.tail))
      # The in-process step compiles the same program: it may load the subprocess's executable.
      jax.config.update("jax_compilation_cache_dir", cache_dir)
    config.train.num_steps = FLAGS.startup_steps  # the schedule is part of the compiled program

    peak = model_bench.matmul_peak(FLAGS.peak_n, FLAGS.peak_repeats)
    trainer = start_trainer(config)
    times = step_seconds(trainer, FLAGS.steps)
    # Other work shares these cores: re-measure the peak and keep the best, so MFU is not inflated.
    peak = max(peak, model_bench.matmul_peak(FLAGS.peak_n, FLAGS.peak_repeats))
    input_rate = input_bench.examples_per_second(
      trainer.train_iter, FLAGS.input_batches, examples_per_step(trainer)
    )

  macs = step_macs(config.model, trainer.plan, trainer.batches)
  print()
  _row("measure", "value", "baseline (same run)", "ratio", "goal", "met")
  _row("-" * 44, "-" * 14, "-" * 26, "-" * 8, "-" * 12, "---")
  _mfu_rows(trainer, macs, times, peak)
  if run is not None:
    _startup_rows(run)
    _memory_rows(run)
  _input_rows(trainer, times, input_rate)
  _details(trainer, macs, cache_warm=run is not None)


if __name__ == "__main__":
  from bench import results

  _define_flags()
  with results.recorded("train"):
    app.run(main)
