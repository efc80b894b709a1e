"""Each bench writes what it printed to bench/results/NAME.md, under one header line naming when,
at which commit and on which CPU it was measured: the docs link there instead of copying figures."""

import contextlib
import datetime
import io
import os
import platform
import subprocess
import sys

# MM_JAX_BENCH_RESULTS_DIR moves them (bench/compare.py's child runs write theirs elsewhere).
RESULTS_DIR = os.environ.get(
  "MM_JAX_BENCH_RESULTS_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
)


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(repo: str, *args: str) -> str:
  run = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)
  return run.stdout.strip()


def commit(repo: str = _REPO) -> str:
  """The checkout's short commit, "+changes" when tracked files other than bench/results/ (the
  benches' own outputs, such as a plot written before its table) differ from it."""
  name = _git(repo, "rev-parse", "--short", "HEAD") or "unknown"
  dirty = _git(repo, "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results")
  return name + ("+changes" if dirty else "")


def header() -> str:
  today = datetime.date.today().isoformat()
  return f"{today} · commit {commit()} · {cpu_model()} ({os.cpu_count()} CPUs)"


def write(name: str, text: str, directory: str = RESULTS_DIR) -> str:
  """bench/results/NAME.md: the header line, a blank line, then `text` as printed."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"{name}.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write(f"{header()}\n\n```\n{text.rstrip()}\n```\n")
  return path


class _Tee(io.TextIOBase):
  def __init__(self, *streams):
    self.streams = streams

  def write(self, text):
    for stream in self.streams:
      stream.write(text)
    return len(text)

  def flush(self):
    for stream in self.streams:
      stream.flush()


@contextlib.contextmanager
def recorded(name: str, directory: str = RESULTS_DIR):
  """Prints as usual and, when the block ends without an error, writes what it printed (absl's
  app.run ends a successful script with SystemExit(0), which counts as success)."""
  captured = io.StringIO()
  try:
    with contextlib.redirect_stdout(_Tee(sys.stdout, captured)):
      yield
  except SystemExit as stop:
    if stop.code not in (0, None):
      raise
    _write_and_say(name, captured.getvalue(), directory)
    raise
  _write_and_say(name, captured.getvalue(), directory)


def _write_and_say(name: str, text: str, directory: str) -> None:
  path = write(name, text, directory)
  print(f"wrote {os.path.relpath(path)}", flush=True)
