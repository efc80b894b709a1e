"""bfloat16 activations against float32, trained on this CPU: loss curves and held-out metrics.

  python bench/precision.py [--runs=tiny,default] [--tiny_steps=200] [--default_steps=150]
      [--out=precision_runs]

On TPUs and GPUs `config.model.dtype="auto"` trains with bfloat16 matmuls, convolutions and
activations (parameters, Adam moments, softmax, router and losses stay float32). This trains the
same config twice on the CPU, `--config.model.dtype=float32` and `=bfloat16`, everything else
equal (seed, data order, steps, schedule), and sets the two side by side: the training loss every
`log_every` steps and the held-out metrics of one evaluation at the last step. XLA:CPU runs
bfloat16 far slower than float32, so the runs are short: this shows that bfloat16 trains like
float32, not how fast.

Writes bench/results/precision.md (tables) and bench/results/precision_curves.png.
"""

import argparse
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

from bench import paper, results  # noqa: E402

DTYPES = ("float32", "bfloat16")
# The default schedule warms up over 150 of its 800 steps and logs every 50: a short run warms up
# over a third of its steps and logs every 10.
SHORT_RUN_FLAGS = {
  "default": lambda steps: [
    f"--config.optimizer.warmup_steps={steps // 3}",
    "--config.train.log_every=10",
  ]
}


def run_pair(size: str, steps: int, eval_batches: int, out: str) -> dict[str, dict]:
  """Trains `:size` for `steps` in each dtype (skipped when its evaluation is on disk)."""
  scalars = {}
  for dtype in DTYPES:
    workdir = os.path.join(out, f"{size}_{dtype}")
    found = paper.read_scalars(workdir)
    if not paper.final_eval(found, steps):
      flags = [
        f"--config={os.path.join(_REPO, 'configs', 'multimodel.py')}:{size}",
        f"--config.model.dtype={dtype}",
        f"--config.train.num_steps={steps}",
        f"--config.train.eval_every={steps}",
        f"--config.train.eval_batches={eval_batches}",
        *SHORT_RUN_FLAGS.get(size, lambda steps: [])(steps),
      ]
      paper.run_one(f"{size} {dtype}", flags, workdir, [])
      found = paper.read_scalars(workdir)
    scalars[dtype] = found
  return scalars


def loss_table(size: str, steps: int, scalars: dict[str, dict]) -> list[str]:
  curves = {dtype: scalars[dtype].get("train/loss", {}) for dtype in DTYPES}
  logged = sorted(set(curves["float32"]) & set(curves["bfloat16"]))
  stride = max(1, len(logged) // 10)  # about ten rows; the curves plot has every point
  logged = sorted(set(logged[::stride]) | set(logged[-1:]))
  lines = [f"`:{size}`, training loss (all tasks, weighted), {steps} steps:", ""]
  lines += ["| step | float32 | bfloat16 | bf16 - f32 |", "|---:|---:|---:|---:|"]
  for step in logged:
    f32, bf16 = curves["float32"][step], curves["bfloat16"][step]
    lines.append(f"| {step} | {f32:.4f} | {bf16:.4f} | {bf16 - f32:+.4f} |")
  return lines + [""]


def eval_table(size: str, steps: int, scalars: dict[str, dict]) -> list[str]:
  final = {dtype: paper.final_eval(scalars[dtype], steps) for dtype in DTYPES}
  tasks = sorted((set(final["float32"]) | set(final["bfloat16"])) - {"moe"})  # metrics, not load
  lines = [f"`:{size}`, held-out at step {steps}:", ""]
  lines += ["| task | metric | float32 | bfloat16 |", "|---|---|---:|---:|"]
  for task in tasks:
    metrics = sorted(set(final["float32"].get(task, {})) | set(final["bfloat16"].get(task, {})))
    for metric in metrics:
      cells = [final[d].get(task, {}).get(metric) for d in DTYPES]
      text = ["" if v is None else f"{v:.4g}" for v in cells]
      lines.append(f"| {task} | {metric} | {text[0]} | {text[1]} |")
  return lines + [""]


def plot(curves: dict[str, dict[str, dict]], path: str) -> None:
  """One panel per config: the training loss of both dtypes against the step."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
  for ax, (size, scalars) in zip(axes.flat, curves.items()):
    for dtype, color in zip(DTYPES, ("C0", "C3")):
      values = scalars[dtype].get("train/loss", {})
      steps = sorted(values)
      ax.plot(steps, [values[s] for s in steps], label=dtype, color=color)
    ax.set_title(f":{size}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default="tiny,default")
  parser.add_argument("--tiny_steps", type=int, default=200)
  parser.add_argument("--default_steps", type=int, default=150)
  parser.add_argument("--eval_batches", type=int, default=2)
  parser.add_argument("--out", default="precision_runs", help="The runs' workdirs.")
  args = parser.parse_args()
  steps = {"tiny": args.tiny_steps, "default": args.default_steps}
  out = os.path.abspath(args.out)
  curves = {}
  with results.recorded("precision"):
    print("float32 against bfloat16 activations on this CPU (parameters and Adam stay float32)\n")
    for size in args.runs.split(","):
      curves[size] = run_pair(size, steps[size], args.eval_batches, out)
      print("\n".join(loss_table(size, steps[size], curves[size])))
      print("\n".join(eval_table(size, steps[size], curves[size])))
  plot(curves, os.path.join(results.RESULTS_DIR, "precision_curves.png"))


if __name__ == "__main__":
  main()
