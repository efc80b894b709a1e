"""The C heap under XLA:CPU: freed memory handed back, and large blocks on huge pages.

XLA's CPU compiler frees gigabytes of scratch when it finishes, but glibc keeps freed blocks in its
arenas for reuse, so the process stays as large as the compile's peak and every step's buffers
stack on top. Measured on the default config: 4.3 GB resident after compiling the step, 2.4 GB
after `malloc_trim(0)`; the steps then peaked at 4.7 GB instead of 6.7 GB.
"""

import ctypes
import os
import sys

_libc = None


def release_freed_memory() -> bool:
  """`malloc_trim(0)` where the C library has it (glibc on Linux); False elsewhere."""
  global _libc
  if not sys.platform.startswith("linux"):
    return False
  if _libc is None:
    try:
      _libc = ctypes.CDLL("libc.so.6")
    except OSError:
      return False
  trim = getattr(_libc, "malloc_trim", None)  # musl has none
  if trim is None:
    return False
  trim(0)
  return True


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
RESTARTED_ENV = "MM_JAX_MALLOC_TUNED"  # set in the restarted process; set it yourself to opt out
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_available() -> bool:
  """glibc >= 2.35 (the hugetlb tunable) and transparent huge pages not switched off."""
  version = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None
  if not sys.platform.startswith("linux") or not version or not version.startswith("glibc "):
    return False
  if tuple(int(x) for x in version.split()[1].split(".")[:2]) < (2, 35):
    return False
  try:
    with open(_THP_MODE) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def restart_with_huge_pages() -> None:
  """Re-executes this process, once, with glibc's malloc backing large blocks by 2 MB pages.

  XLA:CPU allocates every step's temporary buffers afresh and glibc maps blocks that large anew
  each time, so the kernel faults them in 4 KB at a time: 345k page faults per default train step,
  about a fifth of its CPU time. With glibc.malloc.hugetlb=1, 1.4k faults per step and the step
  went from 1.2-1.5 s to 0.9-1.15 s (2 cores). glibc reads the tunable only at process start,
  hence the re-exec; call this before anything heavy is imported.
  """
  if os.environ.get(RESTARTED_ENV) is not None or not huge_pages_available():
    return
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:
    return
  env = dict(os.environ, **{RESTARTED_ENV: "1"})
  env["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
