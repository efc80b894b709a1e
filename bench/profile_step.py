"""Where the train step's time goes: its XLA:CPU kernels, by kind and by part of the model.

  nice python bench/profile_step.py [--config=configs/multimodel.py[:variant]] [--steps=3]

Builds the trainer's own compiled step (bench/train.py's in-process trainer), times a few steps,
then traces `--steps` more with jax.profiler and charges each kernel's time to its HLO
instruction, whose metadata names the jax op and the module it came from (op_name). Kernels run on
every core, so the time is summed over threads, and the profiler slows each step: read the shares
(a kernel's part of all kernel time in the traced steps), not the milliseconds, as the measure.
A higher MFU needs the non-matmul shares to shrink: this shows which.
"""

import collections
import dataclasses
import functools
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

if __name__ == "__main__":  # the trainer's malloc (mm_jax/main.py), so the step matches it
  from mm_jax import memory

  memory.restart_with_tuned_malloc()

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS

# Kernel kinds, by what XLA:CPU does with the instruction. The first whose test matches wins.
# XLA names a fusion after its root ops, so a loop fusion that ends in a transposing copy (the
# LayerNorm gradients the pointwise convs' weight gradients want transposed) counts as a copy.
# Each: (label, its column head in the part-by-kind table, test).
KINDS = (
  (
    "YNNPACK library call (dots, convs, reductions)",
    "YNNPACK",
    lambda n, line: "__ynn_fusion" in line,
  ),
  ("dot or conv (XLA's own)", "XLA dot", lambda n, line: re.search(r" (dot|convolution)\(", line)),
  ("copy or transpose", "copy", lambda n, line: "copy" in n or "transpose" in n),
  ("pad, slice, concatenate", "pad etc.", lambda n, line: re.search("pad|slice|concatenate", n)),
  ("reduction (XLA's own)", "XLA red.", lambda n, line: "reduce" in n),
  ("elementwise (XLA loop fusion)", "elementw.", lambda n, line: True),
)
KIND_COLUMNS = tuple(column for _, column, _ in KINDS)

# Module names in op_name metadata -> the part of the model they belong to.
PARTS = (
  ("embed_inputs/audio", "audio net"),
  ("embed_inputs/image", "image net"),
  ("embed_inputs/language", "language net (in)"),
  ("/encoder/", "encoder"),
  ("/mixer/", "I/O mixer"),
  ("/decoder/", "decoder"),
  ("logits", "language net (out: softmax)"),
  ("categorical", "categorical net"),
  ("auxiliary_ctc", "audio CTC loss (default config only)"),
  ("MultiModel", "model, other (packing, losses inside the model)"),
)
OUTSIDE = "outside the model (loss, optimizer, metrics)"


@dataclasses.dataclass(frozen=True)
class Kernel:
  name: str  # the HLO instruction (a fusion or a single op)
  seconds: float  # per traced step, summed over threads
  shape: str  # its result
  op_name: str  # the jax op it came from, with the module path
  kind: str  # one of KINDS


def instruction_lines(hlo_text: str) -> dict[str, str]:
  """Each instruction's text in an optimized HLO module, by name (the entry's and the fused
  computations' alike: only the entry's are kernels, and those are what traces name)."""
  lines = {}
  for match in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$", hlo_text, re.MULTILINE):
    lines.setdefault(match.group(1), match.group(2))
  return lines


def traced_seconds(trace_dir: str) -> collections.Counter:
  """Total duration of every complete event in the profile under `trace_dir`, by name."""
  (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  totals = collections.Counter()
  for event in events:
    if event.get("ph") == "X":
      totals[event["name"]] += event["dur"] * 1e-6
  return totals


def kernels(hlo_text: str, totals: collections.Counter, steps: int) -> list[Kernel]:
  """The traced events that are instructions of this program, slowest first."""
  lines = instruction_lines(hlo_text)
  found = []
  for name, seconds in totals.items():
    line = lines.get(name)
    if line is None:
      continue  # python frames, executor spans: not kernels of this program
    op_name = re.search(r'op_name="([^"]*)"', line)
    shape = line.split(" ", 1)[0]
    op = op_name.group(1) if op_name else ""
    found.append(Kernel(name, seconds / steps, shape, op, kind(name, line)))
  return sorted(found, key=lambda k: -k.seconds)


def kind(name: str, hlo_line: str) -> str:
  base = re.sub(r"\.\d+$", "", name)
  return next(label for label, _, test in KINDS if test(base, hlo_line))


def part(op_name: str) -> tuple[str, str]:
  """(part of the model, "forward" | "backward") of a kernel's op_name."""
  direction = "backward" if "transpose(" in op_name else "forward"
  label = next((label for key, label in PARTS if key in op_name), OUTSIDE)
  return label, direction


def profile(run_steps, hlo_text: str, steps: int) -> list[Kernel]:
  """Traces `run_steps(steps)`, which runs the program compiled to `hlo_text` `steps` times (and
  blocks until done): the program's kernels."""
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      run_steps(steps)
    totals = traced_seconds(trace_dir)
  return kernels(hlo_text, totals, steps)


def shares_by_part_and_kind(found: list[Kernel]) -> dict[str, dict[str, float]]:
  """{part: {kind: share of all kernel time}}: which kinds of kernel each part's time goes to."""
  total = sum(k.seconds for k in found)
  shares = collections.defaultdict(lambda: dict.fromkeys((label for label, _, _ in KINDS), 0.0))
  for k in found:
    shares[part(k.op_name)[0]][k.kind] += k.seconds / total
  return dict(shares)


def tables(found: list[Kernel], top: int) -> str:
  total = sum(k.seconds for k in found)
  by_kind = collections.Counter()
  by_part = collections.defaultdict(lambda: {"forward": 0.0, "backward": 0.0})
  for k in found:
    by_kind[k.kind] += k.seconds
    label, direction = part(k.op_name)
    by_part[label][direction] += k.seconds
  out = [f"{'kernel kind':<52}{'ms/step':>9}{'share':>8}"]
  for label, seconds in by_kind.most_common():
    out.append(f"{label:<52}{seconds * 1e3:>9.1f}{seconds / total:>8.1%}")
  out += ["", f"{'part of the model':<52}{'fwd ms':>9}{'bwd ms':>9}{'share':>8}"]
  for label, times in sorted(by_part.items(), key=lambda item: -sum(item[1].values())):
    share = sum(times.values()) / total
    out.append(
      f"{label:<52}{times['forward'] * 1e3:>9.1f}{times['backward'] * 1e3:>9.1f}{share:>8.1%}"
    )
  out += ["", f"{'share of all kernel time, by part and kind':<48}"]
  out[-1] += "".join(f"{c:>10}" for c in KIND_COLUMNS)
  cross = shares_by_part_and_kind(found)
  for label in sorted(cross, key=lambda label: -sum(cross[label].values())):
    out.append(f"{label:<48}" + "".join(f"{v:>10.1%}" for v in cross[label].values()))
  out += ["", f"slowest {top} kernels (ms/step, share, result, op):"]
  for k in found[:top]:
    op = re.sub(r"jit\(\w+\)/", "", k.op_name)
    out.append(f"{k.seconds * 1e3:7.1f} {k.seconds / total:6.1%}  {k.shape[:32]:<32} {op[-80:]}")
  return "\n".join(out)


def main(argv):
  del argv
  from bench import train as train_bench

  config = FLAGS.config
  trainer = train_bench.start_trainer(config)
  step_times = train_bench.step_seconds(trainer, FLAGS.timed_steps)
  run_steps = functools.partial(train_bench.step_seconds, trainer)  # the state is donated
  found = profile(run_steps, trainer.step.as_text(), FLAGS.steps)
  kernel_time = sum(k.seconds for k in found)
  print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform}")
  print(f"step, not profiled: median {statistics.median(step_times):.3f} s of {len(step_times)}")
  print(f"kernel time per profiled step (all threads): {kernel_time:.3f} s, {len(found)} kernels\n")
  print(tables(found, FLAGS.top))


if __name__ == "__main__":
  config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "multimodel.py"), "Config file (as main.py)."
  )
  flags.DEFINE_integer("steps", 3, "Profiled steps.")
  flags.DEFINE_integer("timed_steps", 5, "Steps timed without the profiler first.")
  flags.DEFINE_integer("top", 15, "Slowest kernels listed.")
  from bench import results

  with results.recorded("profile_step"):
    app.run(main)
