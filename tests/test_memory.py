"""memory.release_freed_memory really returns freed heap pages (glibc keeps them otherwise), and
memory.restart_with_tuned_malloc really switches malloc (mimalloc, huge pages)."""

import os
import subprocess
import sys

import pytest

from mm_jax import memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh interpreter, so the heap holds only what this makes: 3000 blocks of 96 KB (below glibc's
# 128 KB mmap threshold, so they come from the heap) with small live blocks between them, which
# stop glibc from shrinking the heap from its top when the big blocks are freed.
PROBE = """
import os
import numpy as np
from mm_jax import memory
if os.environ.get("PROBE_RESTART"):
  memory.restart_with_tuned_malloc()
at_once = bool(os.environ.get("PROBE_AT_ONCE")) and memory.purge_freed_memory_at_once()
def resident():
  return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
big, small = [], []
for _ in range(3000):
  big.append(np.ones(96 * 1024 // 8))
  small.append(np.ones(300))
held = resident()
del big
freed = resident()
released = memory.release_freed_memory()
mapped = "libmimalloc" in open("/proc/self/maps").read()
print(released, held, freed, resident(), mapped, at_once)
"""
BIG_BLOCKS = 3000 * 96 * 1024


def _probe(probe, **env_changes):
  """Runs a probe in a fresh interpreter that has not been restarted (nor preloaded) yet."""
  unset = ("GLIBC_TUNABLES", "LD_PRELOAD", memory.RESTARTED_ENV, memory.ALLOCATOR_ENV)
  env = {k: v for k, v in os.environ.items() if k not in unset}
  out = subprocess.run(
    [sys.executable, "-c", probe],
    cwd=REPO,
    env={**env, **env_changes},
    capture_output=True,
    text=True,
  )
  assert out.returncode == 0, out.stderr
  return out.stdout.split()


def test_release_returns_freed_heap_pages_to_the_os():
  out = _probe(PROBE)
  released, held, freed, after = out[0] == "True", *map(int, out[1:4])
  assert out[4] == "False"  # glibc's malloc: nothing preloaded without the restart
  assert released
  assert held - freed < BIG_BLOCKS / 4, "glibc returned the blocks by itself: the probe is moot"
  assert freed - after > BIG_BLOCKS * 0.75, (held, freed, after)


@pytest.mark.parametrize("allocator", ["", "mimalloc"])
def test_restart_preloads_mimalloc_if_asked_which_also_hands_freed_memory_back(allocator):
  out = _probe(PROBE, PROBE_RESTART="1", **{memory.ALLOCATOR_ENV: allocator})
  released, held, freed, after = out[0] == "True", *map(int, out[1:4])
  mimalloc = allocator == "mimalloc" and memory.mimalloc_library() is not None
  assert out[4] == str(mimalloc)
  assert released
  # Freed by mimalloc's own purge or by release_freed_memory, it must not stay resident.
  assert held - after > BIG_BLOCKS * 0.75, (held, freed, after)


def test_mimalloc_purges_at_once_only_when_asked():  # setup.cfg installs it on Linux
  kept = _probe(PROBE, PROBE_RESTART="1", **{memory.ALLOCATOR_ENV: "mimalloc"})
  assert kept[4:] == ["True", "False"]
  held, freed = map(int, kept[1:3])
  assert held - freed < BIG_BLOCKS / 4, "mimalloc's default purge delay returned the blocks"

  purged = _probe(PROBE, PROBE_RESTART="1", PROBE_AT_ONCE="1", **{memory.ALLOCATOR_ENV: "mimalloc"})
  assert purged[4:] == ["True", "True"]
  held, freed = map(int, purged[1:3])
  assert held - freed > BIG_BLOCKS * 0.75, (held, freed)  # before release_freed_memory


def test_purge_at_once_is_a_no_op_under_glibc():
  out = _probe(PROBE, PROBE_AT_ONCE="1")
  assert out[4:] == ["False", "False"]


# Restarts itself with the tunable, then faults in a 256 MB malloc block page by page.
HUGE_PAGES_PROBE = """
import ctypes, os, resource
from mm_jax import memory
memory.restart_with_tuned_malloc()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
size = 256 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(size)
ctypes.memset(block, 1, size)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(os.environ.get("GLIBC_TUNABLES", "-"), faults)
"""


def test_restart_backs_large_blocks_with_huge_pages():
  tunables, faults = _probe(HUGE_PAGES_PROBE)
  small_pages = (256 << 20) // os.sysconf("SC_PAGE_SIZE")
  if memory.huge_pages_available():
    assert tunables == memory.HUGE_PAGES_TUNABLE
    assert int(faults) < small_pages / 4, faults  # 2 MB pages: ~128 faults, not 65,536
  else:  # no THP or no glibc tunable here: the process runs on, unchanged
    assert tunables == "-"
    assert int(faults) > small_pages / 2, faults


def test_restart_preloads_mimalloc_beside_a_library_whose_path_contains_its_own(monkeypatch):
  library = memory.mimalloc_library()
  assert library is not None  # setup.cfg installs cmeel-mimalloc on Linux
  restarted = []

  def execve(path, argv, env):
    restarted.append(env)
    raise SystemExit(0)

  monkeypatch.setattr(os, "execve", execve)
  monkeypatch.delenv(memory.RESTARTED_ENV, raising=False)
  monkeypatch.setenv(memory.ALLOCATOR_ENV, "mimalloc")
  monkeypatch.setenv("LD_PRELOAD", f"{library}.old")  # another file: its path merely contains it
  with pytest.raises(SystemExit):
    memory.restart_with_tuned_malloc()
  assert restarted[0]["LD_PRELOAD"].split() == [library, f"{library}.old"]

  restarted.clear()
  monkeypatch.setenv("LD_PRELOAD", f"/other.so:{library}")  # ld.so also splits on colons
  monkeypatch.setenv("GLIBC_TUNABLES", memory.HUGE_PAGES_TUNABLE)
  memory.restart_with_tuned_malloc()  # nothing to change: no restart
  assert restarted == []
