"""Hands freed heap memory back to the operating system.

XLA's CPU compiler frees gigabytes of scratch when it finishes, but glibc keeps freed blocks in its
arenas for reuse, so the process stays as large as the compile's peak and every step's buffers
stack on top. Measured on the default config: 4.3 GB resident after compiling the step, 2.4 GB
after `malloc_trim(0)`; the steps then peaked at 4.7 GB instead of 6.7 GB.
"""

import ctypes
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
