"""The paper's three findings at embedded scale, as tables in the paper's form.

  python bench/paper.py [--steps=300] [--out=paper_runs] [--runs=NAME,...] [--eval_batches=4]
      [--config=configs/multimodel.py[:size][,modifiers]] [-- --config.x=y ...]

Every run is `python -m mm_jax.main` with a config variant of the base config (nothing else):
- joint: all of the base config's tasks together (Kaiser et al., Table 2, "joint 8-problem");
- single:TASK: TASK alone with the per-step batch it gets in the joint run, so both see the same
  examples of it and differ only in the other tasks (Table 2, "single problem");
- parsing+image: parsing with image classification only, the same two batches (Table 3);
- no_moe, no_attention: the joint run without the mixture of experts / attention (Table 4).
All runs share the step budget, the seed and the schedule (the base config's warm-up, at most
half the budget: scaled down with it, to 56 of 300 steps, it left the digits at chance);
each evaluates once at its last step. A run whose final evaluation is already in `--out` is not
run again, so an interrupted command continues where it stopped.

Writes OUT/paper.md (the tables, also printed) and OUT/curves.png (train log-perplexity per task).
Findings are checked by fixed rules, stated under each table; where one does not hold at this
scale, the table says so. Nothing is tuned per task.
"""

import argparse
import datetime
import glob
import math
import os
import subprocess
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

PARSING, IMAGE = "constituency_parsing", "image_classification"
# Finding 1 holds for a task when the joint log-perplexity is at most this much above the
# single-task one ("about as well"); findings 2 and 3 need joint strictly better / no worse.
ABOUT_AS_WELL = 0.05
NO_WORSE = 0.01  # relative log-perplexity slack for "never hurts" (one seed: rounding-level)
# Each task's standard metric (mm_jax.evaluate) and whether higher is better.
STANDARD_METRICS = {
  "accuracy": True,
  "bleu": True,
  "bracket_f1": True,
  "wer": False,
}


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=os.path.join(_REPO, "configs", "multimodel.py"))
  parser.add_argument("--steps", type=int, default=300, help="Train steps of every run.")
  parser.add_argument("--eval_batches", type=int, default=4, help="Held-out batches per task.")
  parser.add_argument("--out", default="paper_runs", help="Workdirs, paper.md and curves.png.")
  parser.add_argument("--runs", default="", help="Comma-separated run names (default: all).")
  args, passthrough = parser.parse_known_args(argv)
  return args, [a for a in passthrough if a != "--"]


def base_config(config_arg: str, overrides=()):
  """The config the trainer builds from `config_arg` (path[:variant]) and --config.x=y flags,
  parsed by the same ml_collections config flag as mm_jax.main's."""
  from absl import flags
  from ml_collections import config_flags

  path, _, variant = config_arg.partition(":")
  if os.path.basename(path) != "multimodel.py":
    raise SystemExit(f"--config={config_arg}: bench/paper.py builds variants of multimodel.py")
  argv = ["paper.py", f"--config={config_arg}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return flag_values.config, variant


def plan_runs(config_arg: str, steps: int, overrides=()) -> dict[str, list[str]]:
  """Run name -> the trainer's config flags, in the order they run."""
  from mm_jax import mixture

  config, variant = base_config(config_arg, overrides)
  parts = [p for p in (variant or "default").split(",") if p]
  size, modifiers = parts[0], [p for p in parts[1:] if not p.startswith("tasks=")]
  tasks = [t for t in config.data.tasks.split(",") if t]
  shares = mixture.task_batch_sizes(config, data_parallel=1)
  path = config_arg.partition(":")[0]
  # Not scaled with the budget: the classifier head needs the default's long warm-up (the config
  # says why). 300 steps with a 56-step warm-up left the full model's digits at chance, joint and
  # alone; with 150, 93.75% and 84.38%.
  warmup = max(1, min(config.optimizer.warmup_steps, steps // 2))
  common = [
    f"--config.train.num_steps={steps}",
    f"--config.optimizer.warmup_steps={warmup}",
    f"--config.train.checkpoint_every={steps}",
    f"--config.train.log_every={max(1, steps // 20)}",
  ]

  def variant_of(*extra, task_list=None, batch=None):
    mods = [*modifiers, *extra]
    if task_list is not None:
      mods.append("tasks=" + "+".join(task_list))
    flags = [f"--config={path}:" + ",".join([size, *mods])]
    if batch is not None:
      flags.append(f"--config.data.global_batch_size={batch}")
    return flags + common

  runs = {"joint": variant_of(task_list=tasks)}
  for task in tasks:
    runs[f"single:{task}"] = variant_of(task_list=[task], batch=shares[task])
  if PARSING in tasks and IMAGE in tasks and len(tasks) > 2:
    runs["parsing+image"] = variant_of(
      task_list=[PARSING, IMAGE], batch=shares[PARSING] + shares[IMAGE]
    )
  runs["no_moe"] = variant_of("no_moe", task_list=tasks)
  runs["no_attention"] = variant_of("no_attention", task_list=tasks)
  return runs


def read_scalars(workdir: str) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} from a run's TensorBoard event files (clu writes tensor summaries)."""
  import numpy as np
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util

  scalars = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
    acc.Reload()
    for tag in acc.Tags()["tensors"]:
      for event in acc.Tensors(tag):
        value = tensor_util.make_ndarray(event.tensor_proto)
        if value.dtype.kind == "f" and value.ndim == 0:
          scalars.setdefault(tag, {})[event.step] = float(np.asarray(value))
  return scalars


def final_eval(scalars, steps: int) -> dict[str, dict[str, float]]:
  """{task: {metric: value}} of the evaluation at `steps` (empty if the run never got there)."""
  results = {}
  for tag, values in scalars.items():
    if tag.startswith("eval/") and steps in values:
      _, task, metric = tag.split("/", 2)
      results.setdefault(task, {})[metric] = values[steps]
  return results


def run_one(name, flags, workdir, passthrough) -> int:
  os.makedirs(workdir, exist_ok=True)
  command = [sys.executable, "-m", "mm_jax.main", *flags, f"--workdir={workdir}", *passthrough]
  start = time.time()
  with open(os.path.join(workdir, "log.txt"), "w") as log:
    log.write(" ".join(command) + "\n")
    log.flush()
    rc = subprocess.call(command, cwd=_REPO, stdout=log, stderr=subprocess.STDOUT)
  seconds = time.time() - start
  with open(os.path.join(workdir, "wall_minutes.txt"), "w") as f:
    f.write(f"{seconds / 60:.1f}\n")
  print(f"  {name}: rc {rc}, {seconds / 60:.1f} min", flush=True)
  return rc


def wall_minutes(workdir) -> str:
  """The minutes the run took when it ran (kept in its workdir, for reports of later calls)."""
  try:
    with open(os.path.join(workdir, "wall_minutes.txt")) as f:
      return f.read().strip()
  except OSError:
    return "?"


# ---------------------------------------------------------------------------------- the tables


def standard_metric(metrics: dict[str, float]) -> str | None:
  return next((m for m in STANDARD_METRICS if m in metrics), None)


def _cell(metrics, key):
  value = metrics.get(key) if metrics else None
  return "–" if value is None or math.isnan(value) else f"{value:.2f}"


def _metric_label(task, results):
  for metrics in results.values():
    if metrics.get(task) and (m := standard_metric(metrics[task])):
      return m
  return "metric"


def _task_block(task, results, columns):
  """Cells of log-perplexity, token accuracy and the standard metric for each column's run."""
  metric = _metric_label(task, results)
  cells = []
  for run in columns:
    m = results.get(run, {}).get(task)
    cells += [_cell(m, "log_perplexity"), _cell(m, "token_accuracy"), _cell(m, metric)]
  return metric, cells


def _holds(ok) -> str:
  return "–" if ok is None else ("yes" if ok else "**no**")


def _ppl(results, run, task):
  return results.get(run, {}).get(task, {}).get("log_perplexity")


def compare(better_run, other_run, task, results, slack: float):
  """True if better_run's log-perplexity is at most (1 + slack) x other_run's; None if missing."""
  a, b = _ppl(results, better_run, task), _ppl(results, other_run, task)
  if a is None or b is None or math.isnan(a) or math.isnan(b):
    return None
  return a <= b * (1 + slack)


def table(title, header_runs, rows, rule_names, rules, results, note):
  """Markdown: per task, (log-ppl, token acc, metric) for each run, then each rule's verdict."""
  head = ["task", "metric"]
  for run in header_runs:
    head += [f"{run} log-ppl", f"{run} acc %", f"{run} metric"]
  head += rule_names
  lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for task in rows:
    metric, cells = _task_block(task, results, header_runs)
    verdicts = [_holds(rule(task)) for rule in rules]
    lines.append("| " + " | ".join([task, metric, *cells, *verdicts]) + " |")
  return "\n".join([*lines, "", note, ""])


def tables(results, tasks, steps, sizes) -> str:
  single = {t: f"single:{t}" for t in tasks}
  # Table 2 compares two runs per task: merge the single-task runs into one column.
  merged = dict(results)
  merged["single"] = {t: results.get(single[t], {}).get(t, {}) for t in tasks}
  small = sorted(tasks, key=lambda t: sizes[t])[: len(tasks) // 2]
  out = [
    table(
      "Table 2: joint training vs each task alone",
      ["single", "joint"],
      tasks,
      ["joint ≈ single (finding 1)", "joint better (finding 2)"],
      [
        lambda t: compare("joint", "single", t, merged, ABOUT_AS_WELL),
        lambda t: compare("joint", "single", t, merged, 0.0) if t in small else None,
      ],
      merged,
      f"Finding 1 holds for a task when the joint run's held-out log-perplexity is at most "
      f"{100 * ABOUT_AS_WELL:.0f}% above the single-task run's. Finding 2 (tasks with little data "
      f"gain from joint training) is checked on the {len(small)} tasks with the fewest training "
      f"examples here ({', '.join(f'{t} {sizes[t]:,}' for t in small)}): the joint run must be "
      "strictly better.",
    )
  ]
  if "parsing+image" in results or PARSING in tasks:
    cols = [single.get(PARSING, ""), "parsing+image", "joint"]
    out.append(
      table(
        "Table 3: parsing alone, with image classification, with all tasks",
        cols,
        [PARSING],
        ["+image better", "all better"],
        [
          lambda t: compare("parsing+image", cols[0], t, results, 0.0),
          lambda t: compare("joint", cols[0], t, results, 0.0),
        ],
        results,
        "Finding 2 for parsing: adding image classification, then all tasks, lowers the "
        "held-out log-perplexity of parsing.",
      )
    )
  out.append(
    table(
      "Table 4: the joint model without MoE and without attention",
      ["joint", "no_moe", "no_attention"],
      tasks,
      ["MoE never hurts", "attention never hurts"],
      [
        lambda t: compare("joint", "no_moe", t, results, NO_WORSE),
        lambda t: compare("joint", "no_attention", t, results, NO_WORSE),
      ],
      results,
      f"Finding 3 holds for a task when the full joint model's log-perplexity is at most "
      f"{100 * NO_WORSE:.0f}% above the ablated model's. {steps} steps per run, one seed.",
    )
  )
  return "\n".join(out)


def train_examples(config, tasks) -> dict[str, int]:
  """Training examples per task, from the prepared datasets' TFDS metadata."""
  from mm_jax.data import layout, pipeline

  registry = layout.build_tasks(config)
  sizes = {}
  for task in tasks:
    split = registry[task].source.train_split
    sizes[task] = pipeline.builder(config, registry[task]).info.splits[split].num_examples
  return sizes


def plot_curves(curves, tasks, path):
  """One panel per task: train log-perplexity against step for every run that has the task."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  colors = {"joint": "C0", "single": "C1", "parsing+image": "C2", "no_moe": "C3"}
  cols = 4
  rows = math.ceil(len(tasks) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
  for ax, task in zip(axes.flat, tasks):
    for run, scalars in curves.items():
      values = scalars.get(f"train/{task}/log_perplexity")
      if values:
        steps = sorted(values)
        label = "single" if run.startswith("single:") else run
        ax.plot(steps, [values[s] for s in steps], label=label, color=colors.get(label, "C4"))
    ax.set_title(task, fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("train log-perplexity")
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(tasks) :]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def main(argv=None):
  args, passthrough = parse_args(sys.argv[1:] if argv is None else argv)
  runs = plan_runs(args.config, args.steps, passthrough)
  wanted = [r for r in args.runs.split(",") if r] or list(runs)
  unknown = sorted(set(wanted) - set(runs))
  if unknown:
    raise SystemExit(f"--runs: unknown {', '.join(unknown)}; choose from {', '.join(runs)}")
  config, _ = base_config(args.config, passthrough)
  tasks = [t for t in config.data.tasks.split(",") if t]
  out = os.path.abspath(args.out)
  extra = [f"--config.train.eval_batches={args.eval_batches}", *passthrough]
  print(f"{len(wanted)} runs of {args.steps} steps into {out}", flush=True)
  results, curves, minutes = {}, {}, {}
  for name in wanted:
    workdir = os.path.join(out, "runs", name.replace(":", "_"))
    scalars = read_scalars(workdir)
    if not final_eval(scalars, args.steps):
      rc = run_one(name, runs[name], workdir, extra)
      scalars = read_scalars(workdir)
      if rc != 0:
        print(f"  {name} failed: see {os.path.join(workdir, 'log.txt')}", flush=True)
    else:
      print(f"  {name}: evaluated at step {args.steps} already, not run again", flush=True)
    results[name], curves[name] = final_eval(scalars, args.steps), scalars
    minutes[name] = wall_minutes(workdir)
  report = "\n".join(
    [
      f"## The paper's findings at embedded scale ({datetime.date.today().isoformat()})",
      "",
      f"`python bench/paper.py --config={os.path.relpath(args.config, _REPO)} "
      f"--steps={args.steps} --eval_batches={args.eval_batches}`: {len(wanted)} runs, seed "
      f"{config.seed}, {args.steps} steps each, held-out metrics on {args.eval_batches} batches "
      "per task; log-ppl is the held-out log-perplexity per target token (lower is better), "
      "acc the per-token accuracy (teacher-forced), metric the task's own (beam decoding).",
      "",
      tables(results, tasks, args.steps, train_examples(config, tasks)),
      "Minutes per run (wall, when it ran): " + ", ".join(f"{n} {m}" for n, m in minutes.items()),
      "",
    ]
  )
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "paper.md"), "w") as f:
    f.write(report)
  plot_curves(curves, tasks, os.path.join(out, "curves.png"))
  print(report, flush=True)
  print(f"wrote {os.path.join(out, 'paper.md')} and {os.path.join(out, 'curves.png')}")


if __name__ == "__main__":
  from bench import results

  with results.recorded("paper"):
    main()
