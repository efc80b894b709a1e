"""Old code against new, taken turn about: is this checkout's train step as fast as BASE's?

  nice python bench/compare.py --base=REV [--rounds=2] [-- more bench/train.py flags]

Runs `bench/train.py --skip_startup` (the default config's step time and MFU against a matmul
peak measured in the same process) alternately in a git worktree of REV and in this checkout,
`--rounds` times each, BASE first, so that the machine's load drifts over both alike. Prints each
run's step time, peak and MFU, then the medians and the ratio new / base, and writes the table to
bench/results/compare.md. Run it alone: a figure taken beside a compile is not a figure.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

from bench import results  # noqa: E402

_STEP = re.compile(r"step time \(median of \d+\)\s+([\d.]+) s\s+matmul ([\d.]+) GFLOP/s")
_MFU = re.compile(r"MFU = FLOPs / step time / peak\s+([\d.]+)%")


def measure(tree: str, extra: list[str], results_dir: str) -> dict[str, float]:
  """One bench/train.py --skip_startup run in `tree`: its step time, peak and MFU."""
  env = dict(os.environ, MM_JAX_BENCH_RESULTS_DIR=results_dir)
  command = [sys.executable, os.path.join(tree, "bench", "train.py"), "--skip_startup", *extra]
  run = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=False)
  step, mfu = _STEP.search(run.stdout), _MFU.search(run.stdout)
  if run.returncode != 0 or not step or not mfu:
    raise RuntimeError(
      f"bench/train.py failed in {tree} (rc {run.returncode}):\n{run.stderr[-3000:]}"
    )
  return {"step_s": float(step[1]), "peak": float(step[2]), "mfu": float(mfu[1])}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--base", required=True, help="git revision to compare against")
  parser.add_argument("--rounds", type=int, default=2)
  args, extra = parser.parse_known_args()
  extra = [a for a in extra if a != "--"]
  new_commit = results.commit()
  with tempfile.TemporaryDirectory() as scratch:
    base_tree = os.path.join(scratch, "base")
    subprocess.run(
      ["git", "worktree", "add", "--detach", base_tree, args.base],
      cwd=_REPO,
      check=True,
      capture_output=True,
    )
    try:
      base_commit = results.commit(base_tree)
      rows = []
      for round_index in range(args.rounds):
        for label, tree in (("base", base_tree), ("new", _REPO)):
          found = measure(tree, extra, os.path.join(scratch, "results"))
          rows.append((label, round_index, found))
          print(
            f"round {round_index + 1} {label:<4}: step {found['step_s']:.3f} s, "
            f"peak {found['peak']:.1f} GFLOP/s, MFU {found['mfu']:.1f}%",
            flush=True,
          )
    finally:
      subprocess.run(["git", "worktree", "remove", "--force", base_tree], cwd=_REPO, check=False)
  median = {
    label: {k: statistics.median(r[k] for lbl, _, r in rows if lbl == label) for k in rows[0][2]}
    for label in ("base", "new")
  }
  lines = [
    f"bench/train.py --skip_startup {' '.join(extra)}".rstrip()
    + f", {args.rounds} rounds taken turn about",
    f"base = {args.base} ({base_commit}), new = {new_commit}",
    "",
    "| run | step time s | matmul peak GFLOP/s | MFU % |",
    "|---|---:|---:|---:|",
  ]
  for label, round_index, r in rows:
    lines.append(
      f"| {label} {round_index + 1} | {r['step_s']:.3f} | {r['peak']:.1f} | {r['mfu']:.1f} |"
    )
  for label in ("base", "new"):
    m = median[label]
    lines.append(f"| {label}, median | {m['step_s']:.3f} | {m['peak']:.1f} | {m['mfu']:.1f} |")
  ratio = median["new"]["step_s"] / median["base"]["step_s"]
  lines += [
    "",
    f"step time new / base: {ratio:.3f} (medians); MFU new - base: "
    f"{median['new']['mfu'] - median['base']['mfu']:+.1f} points",
  ]
  text = "\n".join(lines)
  print("\n" + text)
  results.write("compare", text)


if __name__ == "__main__":
  main()
