"""memory.release_freed_memory really returns freed heap pages (glibc keeps them otherwise)."""

import os
import subprocess
import sys

from mm_jax import memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh interpreter, so the heap holds only what this makes: 3000 blocks of 96 KB (below glibc's
# 128 KB mmap threshold, so they come from the heap) with small live blocks between them, which
# stop glibc from shrinking the heap from its top when the big blocks are freed.
PROBE = """
import os
import numpy as np
from mm_jax import memory
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
print(released, held, freed, resident())
"""


def test_release_returns_freed_heap_pages_to_the_os():
  out = subprocess.run(
    [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, check=True
  ).stdout.split()
  released, held, freed, after = out[0] == "True", *map(int, out[1:])
  assert released
  big_blocks = 3000 * 96 * 1024
  assert held - freed < big_blocks / 4, "glibc returned the blocks by itself: the probe is moot"
  assert freed - after > big_blocks * 0.75, (held, freed, after)


# Restarts itself with the tunable, then faults in a 256 MB malloc block page by page.
HUGE_PAGES_PROBE = """
import ctypes, os, resource
from mm_jax import memory
memory.restart_with_huge_pages()
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
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", memory.RESTARTED_ENV)}
  out = subprocess.run(
    [sys.executable, "-c", HUGE_PAGES_PROBE], cwd=REPO, env=env, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr
  tunables, faults = out.stdout.split()
  small_pages = (256 << 20) // os.sysconf("SC_PAGE_SIZE")
  if memory.huge_pages_available():
    assert tunables == memory.HUGE_PAGES_TUNABLE
    assert int(faults) < small_pages / 4, faults  # 2 MB pages: ~128 faults, not 65,536
  else:  # no THP or no glibc tunable here: the process runs on, unchanged
    assert tunables == "-"
    assert int(faults) > small_pages / 2, faults
