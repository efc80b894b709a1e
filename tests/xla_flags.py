"""XLA flags for every test process: forced CPU devices and a cheap backend compile.

The tests run tiny programs, so compiling dominates their time. LLVM at -O0 without its
expensive passes compiles in about two thirds of the CPU time; XLA's elemental fusion emitters
(instead of the MLIR fusion emitters and their pass pipelines) take another third to half off a
train step's compile, and the step runs as fast. What a test checks depends on neither (each
compares programs compiled alike, or a float64 reference with a tolerance).
Subprocesses (command-line, fault and multi-process tests) get the same flags, so their
compiles also hit the session's persistent compilation cache.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
ELEMENTAL_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def xla_flags(num_devices: int | None) -> str:
  """The XLA_FLAGS value for a test process with `num_devices` forced CPU devices (None: 1)."""
  flags = f"{FAST_COMPILE} {ELEMENTAL_EMITTERS}"
  if num_devices is None:
    return flags
  return f"--xla_force_host_platform_device_count={num_devices} {flags}"
