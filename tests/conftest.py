"""Test session set-up: 8 forced CPU devices, before anything imports jax."""

import os
import tempfile

import built_once
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
  """One data root for every trainer test, in every worker: the tiny embedded build (made here,
  once) and the tokenizers the tests train there are reused."""

  def build(path):
    from configs.multimodel import get_config
    from mm_jax.data import pipeline

    config = get_config("tiny")
    config.data.data_dir = str(path)
    pipeline.ensure_prepared(config)

  return built_once.build_once(built_once.shared_root(tmp_path_factory) / "tiny_data", build)


# Test files that take a minute or more on 2 cores, longest first.
# `--dist loadfile` hands each worker whole files in collection order (setup.cfg turns off xdist's
# own order, most tests first, which ran the one-test files of several minutes last, each alone).
LONGEST_FIRST = (
  "test_faults.py",
  "test_packing.py",
  "test_train.py",
  "test_model.py",
  "test_multiprocess.py",
  "test_paper.py",
  "test_predict.py",
  "test_microbatches.py",
  "test_aot.py",
  "test_gallery.py",
  "test_decode.py",
  "test_mixture.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept
