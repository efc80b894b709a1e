"""backend.py: JAX_PLATFORMS=cpu only where no accelerator can be there; main.py tunes malloc only
for a CPU-only process. Pure Python: device files and plugins are made in a temporary folder."""

import os
import subprocess
import sys

import pytest

from mm_jax import backend, memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def machine(monkeypatch, tmp_path):
  """Where backend looks, a folder holding only what a test puts there (its /dev, its plugins)
  and no JAX_PLATFORMS. Returns a function that adds a device file or a plugin module."""
  dev = tmp_path / "dev"
  (dev / "vfio").mkdir(parents=True)
  (dev / "vfio" / "vfio").touch()  # VFIO's control file, which a TPU-less machine may have too
  (dev / "null").touch()
  plugins = tmp_path / "site"
  plugins.mkdir()
  monkeypatch.syspath_prepend(str(plugins))
  monkeypatch.setattr(backend, "TPU_DEVICE_PATTERNS", (f"{dev}/accel*", f"{dev}/vfio/[0-9]*"))
  monkeypatch.setattr(backend, "GPU_DEVICE_FILES", (f"{dev}/nvidia0",))
  # Plugin names of this test's own, so that what this machine has installed plays no part.
  monkeypatch.setattr(backend, "GPU_PLUGIN_MODULES", ("mm_test_cuda12_plugin",))
  monkeypatch.setattr(backend, "GPU_PLUGIN_MODULE_PATTERN", r"mm_test_rocm\d+_plugin")
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)

  def add(path: str):
    if path.startswith("/dev/"):
      (dev / path.removeprefix("/dev/")).touch()
    else:
      (plugins / path).mkdir()
      (plugins / path / "__init__.py").touch()

  return add


def test_a_machine_with_nothing_but_a_cpu_gets_jax_platforms_cpu(machine):
  machine("mm_test_other_plugin")
  backend.use_cpu_alone_without_accelerators()
  assert os.environ["JAX_PLATFORMS"] == "cpu"
  assert backend.cpu_only()


@pytest.mark.parametrize(
  "present",
  [
    "/dev/accel0",  # TPU v4
    "/dev/vfio/0",  # TPU v5e, v6e
    "/dev/nvidia0",
    "mm_test_cuda12_plugin",
    "mm_test_rocm60_plugin",
  ],
)
def test_an_accelerator_is_left_to_jax(machine, present):
  machine(present)
  backend.use_cpu_alone_without_accelerators()
  assert "JAX_PLATFORMS" not in os.environ
  assert not backend.cpu_only()


@pytest.mark.parametrize("value, cpu_only", [("tpu", False), ("cpu,tpu", False), ("cpu", True)])
def test_a_chosen_platform_is_kept(machine, monkeypatch, value, cpu_only):
  monkeypatch.setenv("JAX_PLATFORMS", value)
  backend.use_cpu_alone_without_accelerators()
  assert os.environ["JAX_PLATFORMS"] == value
  assert backend.cpu_only() == cpu_only


def test_the_real_machine_is_probed_without_importing_jax():
  """This machine as it is, in a fresh interpreter: backend.py imports nothing heavy."""
  probe = (
    "import sys\nfrom mm_jax import backend\nbackend.use_cpu_alone_without_accelerators()\n"
    "print(backend.cpu_only(), 'jax' in sys.modules)"
  )
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  out = subprocess.run(
    [sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, check=True
  )
  cpu_only, jax_imported = out.stdout.split()
  assert jax_imported == "False"
  assert cpu_only == str(not backend.accelerator_present())


# main.py's first lines, up to the re-execution, which prints instead of restarting. The glibc
# tunable is reported present, so the restart's decision is the backend's alone on any machine.
MAIN_START = """
import os, sys
sys.argv = ["main"]
os.execve = lambda *args: print("restarted", os.environ.get("JAX_PLATFORMS")) or sys.exit(0)
import mm_jax.memory
mm_jax.memory.huge_pages_available = lambda: True
import mm_jax.main
print("not restarted", os.environ.get("JAX_PLATFORMS"))
"""


@pytest.mark.parametrize(
  "platforms, want", [("cpu", "restarted cpu"), ("tpu", "not restarted tpu")]
)
def test_main_tunes_malloc_only_for_a_cpu_only_process(platforms, want):
  unset = ("GLIBC_TUNABLES", "LD_PRELOAD", memory.RESTARTED_ENV, memory.ALLOCATOR_ENV)
  env = {k: v for k, v in os.environ.items() if k not in unset}
  out = subprocess.run(
    [sys.executable, "-c", MAIN_START],
    cwd=REPO,
    env={**env, "JAX_PLATFORMS": platforms},
    capture_output=True,
    text=True,
  )
  assert out.stdout.strip() == want, out.stderr
