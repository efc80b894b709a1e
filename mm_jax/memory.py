"""The C heap under XLA:CPU: freed memory handed back, large blocks on huge pages, another malloc.

XLA's CPU compiler frees gigabytes of scratch when it finishes, but glibc keeps freed blocks in its
arenas for reuse, so the process stays as large as the compile's peak and every step's buffers
stack on top. Measured on the default config: 4.3 GB resident after compiling the step, 2.4 GB
after `malloc_trim(0)`; the steps then peaked at 4.7 GB instead of 6.7 GB.
"""

import ctypes
import os
import sys

_libc = None
_mi_collect = None  # mimalloc's, where it is preloaded: looked up once, beside _libc
_MI_OPTION_PURGE_DELAY = 15  # mi_option_purge_delay in mimalloc.h (2.x and 3.x)


def _process_symbol(name: str):
  """A C function the process has loaded (mimalloc's, where it is preloaded), or None."""
  return getattr(ctypes.CDLL(None), name, None)


def release_freed_memory() -> bool:
  """Freed heap pages back to the OS: mimalloc's `mi_collect` where it is preloaded, and glibc's
  `malloc_trim(0)`; False where neither exists (not Linux, musl)."""
  global _libc, _mi_collect
  if not sys.platform.startswith("linux"):
    return False
  if _libc is None:
    try:
      _libc = ctypes.CDLL("libc.so.6")
    except OSError:
      return False
    _mi_collect = _process_symbol("mi_collect")
  if _mi_collect is not None:
    _mi_collect(ctypes.c_bool(True))
  trim = getattr(_libc, "malloc_trim", None)  # musl has none
  if trim is not None:
    trim(0)
  return _mi_collect is not None or trim is not None


def purge_freed_memory_at_once() -> bool:
  """From now on mimalloc hands freed pages back to the OS at once; False without mimalloc.

  Its default delay (1000 ms in cmeel-mimalloc 3.4) keeps what XLA's threads free, which makes the
  step's compile about 20 CPU-s cheaper but held 4.8-6.5 GB through the steps (7.0 GB peak over
  the default run). Called once the first step has run, it keeps the cheap start-up and bounds
  the steps' memory (4.6 GB peak), but every step then faults its buffers in anew.
  """
  option_set = _process_symbol("mi_option_set") if sys.platform.startswith("linux") else None
  if option_set is None:
    return False
  option_set(ctypes.c_int(_MI_OPTION_PURGE_DELAY), ctypes.c_long(0))
  return True


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
RESTARTED_ENV = "MM_JAX_MALLOC_TUNED"  # set in the restarted process; set it yourself to opt out
ALLOCATOR_ENV = "MM_JAX_ALLOCATOR"  # "mimalloc": preload it (opt-in: see restart_with_tuned_malloc)
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


def mimalloc_library() -> str | None:
  """libmimalloc.so of the cmeel-mimalloc wheel (setup.cfg installs it on Linux), if any."""
  if not sys.platform.startswith("linux"):
    return None
  import importlib.metadata  # only when asked for: main.py runs this module first

  try:
    files = importlib.metadata.files("cmeel-mimalloc") or ()
  except importlib.metadata.PackageNotFoundError:
    return None
  for file in files:
    if file.name == "libmimalloc.so":
      path = os.path.abspath(str(file.locate()))
      return path if os.path.isfile(path) else None
  return None


def restart_with_tuned_malloc() -> None:
  """Re-executes this process, once, on mimalloc and with glibc's large blocks on 2 MB pages.

  XLA:CPU allocates every step's temporary buffers afresh and glibc maps blocks that large anew
  each time, so the kernel faults them in 4 KB at a time: 345k page faults per default train step,
  about a fifth of its CPU time. With glibc.malloc.hugetlb=1, 1.4k faults per step and the step
  went from 1.2-1.5 s to 0.9-1.15 s (2 cores). With `MM_JAX_ALLOCATOR=mimalloc`, mimalloc is
  preloaded as well (it then serves every malloc of XLA, TensorFlow and Python): the default
  run's start took about 20 CPU-s less, but its 800 steps peaked at 7.0 GB resident against about
  4 GB; with `purge_freed_memory_at_once` after the first step, 4.6 GB, but each step then faults
  its buffers in anew, hence opt-in (docs/performance.md, *Memory and the allocator*). Both are
  read only at process start, hence the re-exec; call this before anything heavy is imported.
  """
  if os.environ.get(RESTARTED_ENV) is not None:
    return
  changes = {}
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if huge_pages_available() and "glibc.malloc.hugetlb" not in tunables:
    changes["GLIBC_TUNABLES"] = (
      f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE
    )
  library = mimalloc_library() if os.environ.get(ALLOCATOR_ENV) == "mimalloc" else None
  preloaded = os.environ.get("LD_PRELOAD", "")
  if library and library not in preloaded.replace(":", " ").split():  # ld.so's separators
    changes["LD_PRELOAD"] = f"{library} {preloaded}".strip()
  if not changes:
    return
  env = dict(os.environ, **changes, **{RESTARTED_ENV: "1"})
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
