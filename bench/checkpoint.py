"""The cost of checkpoint checksums: save and restore the train state with and without them.

  python bench/checkpoint.py [--size=default] [--repeats=5] [--dir=/tmp] [--note=TEXT]

The state is the config's initial train state (parameters and optimizer state; the values do not
matter). "with" is mm_jax's Checkpointer: the arrays' CRC32s taken at save, committed in the step,
verified at restore. "without" is the same orbax CheckpointManager saving and restoring the state
and data items alone (after the metadata check a restore made before checksums too). The two take
turns, each in a fresh directory, and the order alternates from one repeat to the next. Times are
medians over the repeats:

  save (blocking)  what the training loop waits for: the save call (async orbax copies the arrays
                   to the host; mm_jax also takes their checksums here)
  save (committed) until the step is on disk (save, then wait)
  restore          the newest step read back onto the state's shardings (and verified)

Prints a Markdown table and writes it to bench/results/checkpoint.md (bench/results.py's
`write` when that exists).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import orbax.checkpoint as ocp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs import multimodel as multimodel_config  # noqa: E402
from mm_jax import checkpointing  # noqa: E402
from mm_jax import run as run_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = {"batches": {}}


def with_checksums(directory, state, target):
  ckpt = checkpointing.Checkpointer(directory, keep=1)
  start = time.perf_counter()
  ckpt.save(1, state, DATA)
  blocking = time.perf_counter() - start
  ckpt.wait()
  committed = time.perf_counter() - start
  ckpt.close()
  ckpt = checkpointing.Checkpointer(directory, keep=1)
  start = time.perf_counter()
  _, restored, _ = ckpt.restore_latest(target)
  jax.block_until_ready(restored)
  restore = time.perf_counter() - start
  ckpt.close()
  return blocking, committed, restore


def without_checksums(directory, state, target):
  ckpt = checkpointing.Checkpointer(directory, keep=1)  # the same manager, items state and data
  start = time.perf_counter()
  ckpt.manager.save(
    1, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(DATA))
  )
  blocking = time.perf_counter() - start
  ckpt.manager.wait_until_finished()
  committed = time.perf_counter() - start
  ckpt.close()
  ckpt = checkpointing.Checkpointer(directory, keep=1)
  start = time.perf_counter()
  ckpt.check_matches(target)
  restored = ckpt.manager.restore(
    1,
    args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()),
  )
  jax.block_until_ready(restored["state"])
  restore = time.perf_counter() - start
  ckpt.close()
  return blocking, committed, restore


def header() -> str:
  commit = subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
  ).stdout.strip()
  cpu = "unknown CPU"
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
  return f"{time.strftime('%Y-%m-%d %H:%M %Z')}, commit {commit or 'unknown'}, {cpu}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="default")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the checkpoints go")
  parser.add_argument("--note", default="", help="a line on the conditions, e.g. the load")
  args = parser.parse_args()

  config = multimodel_config.get_config(args.size)
  run = run_lib.build(config, check_data=False)
  state = jax.block_until_ready(run.init_state())
  target = run.sharded_state_specs()
  leaves = jax.tree.leaves(state)
  size = sum(leaf.nbytes for leaf in leaves)
  print(f":{args.size} train state: {len(leaves)} arrays, {size / 2**20:.1f} MiB", flush=True)

  # Checksums alone, on the host copies the save takes.
  start = time.perf_counter()
  sums = checkpointing.checksums(state)
  take = time.perf_counter() - start
  start = time.perf_counter()
  assert checkpointing.checksum_mismatch(state, sums) is None
  verify = time.perf_counter() - start

  kinds = {"without": without_checksums, "with": with_checksums}
  times = {kind: [] for kind in kinds}
  root = tempfile.mkdtemp(prefix="mm_jax_bench_checkpoint_", dir=args.dir)
  try:
    without_checksums(os.path.join(root, "warm-up"), state, target)  # orbax's first-call costs
    for repeat in range(args.repeats):
      order = list(kinds) if repeat % 2 == 0 else list(reversed(kinds))
      for kind in order:
        directory = os.path.join(root, f"{kind}-{repeat}")
        times[kind].append(kinds[kind](directory, state, target))
        shutil.rmtree(directory)
  finally:
    shutil.rmtree(root, ignore_errors=True)

  rows = ["| | save (blocking) s | save (committed) s | restore s |", "|---|---|---|---|"]
  medians = {k: [statistics.median(t[i] for t in v) for i in range(3)] for k, v in times.items()}
  for kind in kinds:
    rows.append(f"| {kind} checksums | " + " | ".join(f"{x:.3f}" for x in medians[kind]) + " |")
  extra = [w - wo for w, wo in zip(medians["with"], medians["without"])]
  rows.append("| difference | " + " | ".join(f"{x:+.3f}" for x in extra) + " |")
  text = "\n".join(
    [
      f"# Checkpoint checksums: `:{args.size}` train state, {len(leaves)} arrays, "
      f"{size / 2**20:.1f} MiB",
      "",
      header(),
      *([args.note] if args.note else []),
      "",
      f"Medians of {args.repeats} turns each, taken turn about, on {jax.devices()[0].platform}; "
      f"checksums alone: {take:.3f} s to take (CRC32 of the host bytes), "
      f"{verify:.3f} s to verify.",
      "",
      *rows,
      "",
    ]
  )
  print(text, flush=True)
  try:
    from bench import results
  except ImportError:
    results = None
  if results is not None and hasattr(results, "write"):
    results.write("checkpoint", text)
  else:
    path = os.path.join(ROOT, "bench", "results", "checkpoint.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(text)
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
