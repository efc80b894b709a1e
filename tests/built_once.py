"""What a test run builds once and every pytest-xdist worker reuses: the tiny data, a trained run.

Each worker is a process with its own session fixtures; without this each built its own copy
(tens of seconds apiece). The first worker to ask builds under an exclusive file lock while the
others wait for it, so no two builds ever write the same directory.
"""

import fcntl
import os


def shared_root(tmp_path_factory):
  """The run's temporary directory: under xdist, the parent of every worker's own."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(path, build):
  """`path`, made by `build(path)` unless an earlier call (in any worker) completed it."""
  done = path.with_name(f"{path.name}.done")
  with open(path.with_name(f"{path.name}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
    if not done.exists():
      build(path)
      done.write_text("ok")
  return path
