"""Test session set-up: 8 forced CPU devices, before anything imports jax."""

import os
import tempfile

from xla_flags import xla_flags

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow is used for tf.data only: keep it off any accelerator and quiet.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
# Many tests compile the same programs (each trainer run builds its step afresh): a persistent
# compilation cache, private to this session, lets later compiles of an identical program hit.
# Trainer subprocesses (fault, multi-process and command-line tests) inherit it through the
# environment, so their repeated compiles of one program hit the cache too.
_CACHE_DIR = tempfile.mkdtemp(prefix="mm_jax_jit_cache_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def devices():
  devs = jax.devices()
  assert len(devs) == 8, f"expected 8 forced CPU devices, got {len(devs)}"
  return devs


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
  """One data root for every trainer test: the tiny embedded build and tokenizers are reused."""
  return tmp_path_factory.getbasetemp() / "tiny_data"
