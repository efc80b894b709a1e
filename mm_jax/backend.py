"""Which backend this process will use, decided before JAX is imported.

JAX looks for every platform it has a plugin for. With libtpu installed (the `test` extra installs
it, to compile for TPU slices ahead of time) but no TPU, that probe prints noise on every start
(`Failed to find host bounds`, `TPU_WORKER_HOSTNAMES`, a source-location trace). Where nothing but
the CPU can be found, `JAX_PLATFORMS=cpu` skips the probe; a TPU VM or a GPU machine is left to
JAX's own discovery. Only this module's standard-library imports run: it must come first.
"""

import glob
import importlib.util
import os
import pkgutil
import re

# Device files a TPU VM has: /dev/accel0.. (v4 and earlier, v5p), /dev/vfio/0.. (v5e, v6e).
TPU_DEVICE_PATTERNS = ("/dev/accel*", "/dev/vfio/[0-9]*")
GPU_DEVICE_FILES = ("/dev/nvidia0",)
GPU_PLUGIN_MODULES = ("jax_cuda12_plugin", "jax_cuda13_plugin")
GPU_PLUGIN_MODULE_PATTERN = r"jax_rocm\d+_plugin"  # jax_rocm60_plugin, jax_rocm7_plugin, ...


def tpu_device_files() -> list[str]:
  return [path for pattern in TPU_DEVICE_PATTERNS for path in glob.glob(pattern)]


def gpu_plugin_installed() -> bool:
  """A JAX GPU plugin (CUDA or ROCm) is importable: found, not imported."""
  if any(importlib.util.find_spec(name) is not None for name in GPU_PLUGIN_MODULES):
    return True
  pattern = re.compile(GPU_PLUGIN_MODULE_PATTERN)
  return any(pattern.fullmatch(module.name) for module in pkgutil.iter_modules())


def accelerator_present() -> bool:
  """A TPU's device files, a GPU's, or a GPU plugin: JAX may find something beside the CPU."""
  gpu_files = any(os.path.exists(path) for path in GPU_DEVICE_FILES)
  return bool(tpu_device_files()) or gpu_files or gpu_plugin_installed()


def use_cpu_alone_without_accelerators() -> None:
  """Sets JAX_PLATFORMS=cpu where it is unset and no accelerator can be there.

  Call before JAX is imported; a JAX_PLATFORMS already set (even to "cpu,tpu") is kept.
  """
  if os.environ.get("JAX_PLATFORMS"):
    return
  if not accelerator_present():
    os.environ["JAX_PLATFORMS"] = "cpu"


def start_command(module_name: str) -> None:
  """What a command (`python -m mm_jax.X`, whose module is "__main__") does before JAX or
  TensorFlow is imported: the CPU alone where nothing else can be found, and TensorFlow's C++
  start-up notes kept off stderr, whose lines are the command's own. Imported as a library, the
  module leaves the process as it is."""
  if module_name != "__main__":
    return
  use_cpu_alone_without_accelerators()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cpu_only() -> bool:
  """JAX_PLATFORMS names the CPU alone: this process runs on no accelerator."""
  platforms = {p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()}
  return platforms == {"cpu"}
