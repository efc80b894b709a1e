"""Faults a long run meets: NaN gradients, damaged checkpoints (truncated, metadata deleted,
flipped bytes, all of them), a failing save or full disk, kill -9, SIGTERM (also at start-up), and
wrong flags (an empty --workdir, evaluate's bad arguments).

The damage is done to copies of one run's workdir (nonfinite_run), which its config then resumes,
in this process and on the command line. The kill/SIGTERM test runs the real command line in
subprocesses; its unbroken reference run, in this process, compiles the programs they then read
from the session's persistent compilation cache.
"""

import gc
import glob
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import short_kernels  # noqa: E402
import xla_flags

from configs import multimodel as multimodel_config  # noqa: E402
from mm_jax import checkpointing, evaluate, predict, train  # noqa: E402
from mm_jax import step as step_lib  # noqa: E402
from mm_jax.errors import ConfigError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "image_classification"  # one small task: these tests are about the loop, not the tasks


@pytest.fixture(scope="module")
def data_dir(tiny_data_dir):
  """The session's shared tiny data root: its embedded build and tokenizers are reused."""
  return str(tiny_data_dir)


def test_injection_traces_nothing_when_empty():
  grads = {"w": jnp.ones(3), "b": jnp.zeros(2)}
  assert step_lib.inject_nonfinite(grads, jnp.int32(4), ()) is grads
  hit = step_lib.inject_nonfinite(grads, jnp.int32(4), (2, 4))
  missed = step_lib.inject_nonfinite(grads, jnp.int32(3), (2, 4))
  assert all(np.isnan(x).all() for x in jax.tree.leaves(hit))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(missed), jax.tree.leaves(grads)))


# --- non-finite updates: skipped, counted, and a streak stops the run -------------------------

# 0-based steps whose gradients become NaN: logged steps 3, 5, 6, 7 skip their update.
INJECTED = (2, 4, 5, 6)
LIMIT = 3


def _scalars(workdir, tag):
  from tensorboard.backend.event_processing import event_accumulator

  values = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
    acc.Reload()
    for event in acc.Tensors(tag) if tag in acc.Tags()["tensors"] else []:
      values[event.step] = float(np.asarray(jax.device_get(_tensor(event))))
  return values


def _tensor(event):
  from tensorboard.util import tensor_util

  return tensor_util.make_ndarray(event.tensor_proto)


def nonfinite_config(data_dir):
  """A fixed-batch run on one device with NaN gradients injected."""
  config = short_kernels.apply(multimodel_config.get_config(f"tiny,tasks={TASK}"))
  config.data.data_dir = data_dir
  config.mesh.data = 1
  config.model.moe.noisy_gating = False  # the same batch must give the same loss on equal params
  config.train.update(
    num_steps=10,
    log_every=1,
    eval_every=1000,
    eval_batches=0,
    checkpoint_every=1,
    fixed_batch=True,
    inject_nonfinite_steps=INJECTED,
    max_consecutive_nonfinite=LIMIT,
  )
  return config


@pytest.fixture(scope="module")
def nonfinite_run(data_dir, tmp_path_factory):
  """nonfinite_config's run; returns (workdir, error)."""
  config = nonfinite_config(data_dir)
  workdir = str(tmp_path_factory.mktemp("nonfinite"))
  with pytest.raises(train.NonFiniteError) as info:
    train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return workdir, str(info.value)


@pytest.mark.slow
def test_nonfinite_updates_are_skipped_counted_and_a_streak_stops(nonfinite_run):
  workdir, error = nonfinite_run
  losses = _scalars(workdir, "train/loss")
  skipped = _scalars(workdir, "train/nonfinite_skipped_total")
  # The run stopped at the end of the third skipped step in a row (logged step 7).
  assert sorted(skipped) == list(range(1, 8))
  assert [skipped[s] for s in range(1, 8)] == [0, 0, 1, 1, 2, 3, 4]
  # A skipped update leaves the parameters alone: the next step sees the same loss on the
  # same (fixed) batch, bit for bit; an applied update changes it.
  assert losses[4] == losses[3] and losses[3] != losses[2]
  assert losses[6] == losses[5] == losses[7] and losses[5] != losses[4]
  assert f"{LIMIT} consecutive steps" in error and "step 4" in error
  # Checkpoints only of states reached through finite updates; the last one restores.
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=3)
  assert ckpt.steps() == [1, 2, 4]
  step, state, data_state = ckpt.restore_latest(None)
  ckpt.close()
  assert step == 4 and int(state["nonfinite_total"]) == 1 and int(state["step"]) == 4
  assert data_state["batches"] == {TASK: 1}  # fixed_batch: only the first batch was read


# A failed orbax restore leaves its other array reads as coroutines never awaited; collected
# later, each prints an "Exception ignored" warning under whichever test is running then.
ORPHANED_READS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.mark.slow
@ORPHANED_READS
def test_truncated_latest_checkpoint_falls_back_with_a_warning(nonfinite_run, tmp_path, caplog):
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(os.path.join(nonfinite_run[0], "checkpoints"), directory)
  newest = glob.glob(os.path.join(directory, "4", "state", "**", "d", "*"), recursive=True)
  biggest = max(newest, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  ckpt = checkpointing.Checkpointer(directory, keep=3)
  with caplog.at_level("WARNING"):
    step, state, _ = ckpt.restore_latest(None)
  ckpt.close()
  assert step == 2 and int(state["step"]) == 2
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any("step 4" in w and "is damaged" in w for w in warnings), warnings
  gc.collect()  # the failed restore's orphaned reads: here, under this test's warning filter


def _files(directory):
  """Every file under `directory` with its size and modification time."""
  return {
    path: (os.path.getsize(path), os.path.getmtime(path))
    for path in glob.glob(os.path.join(directory, "**"), recursive=True)
    if os.path.isfile(path)
  }


# A config change the checkpoints cannot follow -> what the one-line error must say.
CHANGED = {
  "model": (
    lambda config: config.model.update(d=48),  # the run that wrote them had d=32
    r"step 4 of another model .*params\.\S+ has shape \([\d, ]+\), this config's \([\d, ]+\)",
  ),
  "data": (
    lambda config: config.data.update(seed=1),
    r"data position was saved with other data settings \(config\.data\.seed: 0 then, 1 now\)",
  ),
}


@pytest.mark.slow
@pytest.mark.parametrize("changed", sorted(CHANGED))
def test_checkpoints_another_config_cannot_continue_are_a_config_error_and_stay(
  changed, nonfinite_run, data_dir, tmp_path, monkeypatch
):
  """Another model's checkpoints were passed over as unreadable: the run started afresh in
  their directory, and keep-N would have deleted them. Other data settings failed after the
  compile, with a traceback. Both replaced the workdir's config.json first. Now both stop before
  compiling, with one line, and leave the workdir as it was."""
  workdir = str(tmp_path / "work")
  shutil.copytree(nonfinite_run[0], workdir)  # checkpoints, config.json, event files
  before = _files(workdir)
  config = nonfinite_config(data_dir)
  change, expected = CHANGED[changed]
  change(config)
  compiles = []
  monkeypatch.setattr(train, "compile_in_background", lambda *args: compiles.append(args))
  with pytest.raises(ConfigError) as info:
    train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  message = str(info.value)
  assert "\n" not in message and "--workdir" in message, message
  assert re.search(expected, message), message
  assert compiles == []  # the step's compile had not started
  # Nothing written: the config.json that predict and evaluate read still describes them.
  assert _files(workdir) == before


@pytest.mark.slow
def test_a_finished_run_rerun_evaluates_its_checkpoint_without_compiling_the_step(
  nonfinite_run, data_dir, tmp_path, monkeypatch
):
  """The command rerun after its run ended compiled the step, trained nothing and printed
  nothing. Now it evaluates the last checkpoint and leaves the checkpoints alone."""
  workdir = str(tmp_path / "work")
  shutil.copytree(nonfinite_run[0], workdir)
  checkpoints = _files(os.path.join(workdir, "checkpoints"))
  config = nonfinite_config(data_dir)
  config.train.update(num_steps=4, eval_batches=1)  # the newest checkpoint is step 4
  compiles = []
  monkeypatch.setattr(train, "compile_in_background", lambda *args: compiles.append(args))
  result = train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  assert compiles == [] and result["train"] == []
  assert set(result["eval"]) == {TASK} and 0 <= result["eval"][TASK]["accuracy"] <= 100
  assert _files(os.path.join(workdir, "checkpoints")) == checkpoints
  # The newest checkpoint, restored the way `python -m mm_jax.evaluate` does, gives the same.
  config.mesh.data = -1  # load_trained's mesh spans every device: 8 here
  trained = predict.load_trained(workdir, config)
  evaluator = evaluate.Evaluator(trained.run, trained.tokenizer)
  assert trained.step == 4
  want = evaluator.evaluate(trained.params)
  assert want.keys() == result["eval"].keys()
  for name, metrics in want.items():
    for key, value in metrics.items():
      np.testing.assert_allclose(result["eval"][name][key], value, rtol=1e-5, err_msg=key)


def test_restoring_other_shapes_is_a_config_error_naming_the_leaf(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep=2)
  ckpt.save(1, {"params": {"w": jnp.arange(6.0)}, "step": jnp.int32(1)}, {"batches": {}})
  ckpt.wait()
  wanted = {"params": {"w": jax.ShapeDtypeStruct((5,), jnp.float32)}, "step": jnp.int32(0)}
  with pytest.raises(
    ConfigError, match=r"step 1 .*params\.w has shape \(6,\), this config's \(5,\)"
  ):
    ckpt.restore_latest(wanted)
  wanted["params"]["w"] = jax.ShapeDtypeStruct((6,), jnp.float32)
  step, state, _ = ckpt.restore_latest(wanted)
  ckpt.close()
  assert step == 1 and np.array_equal(state["params"]["w"], np.arange(6.0))


def test_shape_difference_names_what_differs():
  stored = {"params.b": (2,), "params.w": (3, 4), "step": ()}
  assert checkpointing.shape_difference(stored, dict(stored)) is None
  assert checkpointing.shape_difference(stored, {**stored, "params.w": (3, 5)}) == (
    "params.w has shape (3, 4), this config's (3, 5)"
  )
  assert checkpointing.shape_difference(stored, {**stored, "params.v": (1,)}) == "it lacks params.v"
  fewer = {k: v for k, v in stored.items() if k != "params.b"}
  assert checkpointing.shape_difference(stored, fewer) == (
    "it has params.b, which this config's state lacks"
  )
  # Parameters are named before optimizer state: their names say which part of the model differs.
  assert checkpointing.shape_difference(
    {"opt_state.mu.w": (3,), "params.w": (3,)}, {"opt_state.mu.w": (4,), "params.w": (4,)}
  ).startswith("params.w")


@pytest.mark.slow
@ORPHANED_READS
def test_no_readable_checkpoint_stops_the_run_instead_of_starting_afresh(nonfinite_run, tmp_path):
  """Falling back past every checkpoint used to mean a fresh start in their directory, whose
  saves keep-N would then use to delete them (a storage outage would have cost the run)."""
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(os.path.join(nonfinite_run[0], "checkpoints"), directory)
  for step in (1, 2, 4):
    arrays = glob.glob(os.path.join(directory, str(step), "state", "**", "d", "*"), recursive=True)
    biggest = max(arrays, key=os.path.getsize)
    with open(biggest, "r+b") as f:
      f.truncate(os.path.getsize(biggest) // 2)
  before = _files(directory)
  ckpt = checkpointing.Checkpointer(directory, keep=3)
  with pytest.raises(checkpointing.CheckpointReadError) as info:
    ckpt.restore_latest(None)
  ckpt.close()
  message = str(info.value)
  assert "\n" not in message and directory in message and "none of the 3" in message, message
  assert "steps 1-4" in message and "move them away" in message, message
  assert "can be read intact" in message
  assert _files(directory) == before
  gc.collect()  # the failed restores' orphaned reads: here, under this test's warning filter


# --- damaged checkpoints: verified, moved aside, restored from the previous step, rewritten ---


def _biggest_array_file(step_dir):
  arrays = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  return max(arrays, key=os.path.getsize)


def _truncate(step_dir):
  biggest = _biggest_array_file(step_dir)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)


def _delete_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _flip_64_bytes(step_dir):
  biggest = _biggest_array_file(step_dir)
  middle = os.path.getsize(biggest) // 2
  with open(biggest, "r+b") as f:
    f.seek(middle)
    flipped = bytes(b ^ 0xFF for b in f.read(64))
    f.seek(middle)
    f.write(flipped)


DAMAGE = {"truncated": _truncate, "metadata deleted": _delete_metadata, "flipped": _flip_64_bytes}


def _restore_step(directory, step):
  """The step's train state, read as saved (no checksum check): the reference to compare with."""
  ckpt = checkpointing.Checkpointer(directory, keep=3)
  restored = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  ckpt.close()
  return jax.device_get(restored["state"])


def _assert_bitwise_equal(got, want, rtol=None):
  """Bit for bit; with `rtol`, to that relative tolerance."""
  leaves = jax.tree.leaves_with_path(want)
  assert len(leaves) == len(jax.tree.leaves(got))
  for (path, w), g in zip(leaves, jax.tree.leaves(got)):
    if rtol is None:
      assert np.array_equal(np.asarray(w), np.asarray(g)), jax.tree_util.keystr(path)
    else:
      np.testing.assert_allclose(g, w, rtol=rtol, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_flipped_bytes_fail_the_checksum_and_the_previous_step_is_restored(tmp_path, caplog):
  directory = str(tmp_path / "checkpoints")
  ckpt = checkpointing.Checkpointer(directory, keep=3)
  for step in (1, 2):
    state = {"params": {"w": jnp.arange(50_000.0) * step, "b": jnp.ones(3)}, "step": step}
    ckpt.save(step, jax.tree.map(jnp.asarray, state), {"batches": {}})
  ckpt.close()
  saved = json.loads(pathlib.Path(directory, "2", "checksums", "metadata").read_text())
  assert saved["algorithm"] == "crc32" and set(saved["leaves"]) == {"params.b", "params.w", "step"}
  _flip_64_bytes(os.path.join(directory, "2"))
  ckpt = checkpointing.Checkpointer(directory, keep=3)
  with caplog.at_level("WARNING"):
    step, state, _ = ckpt.restore_latest(None)
  assert step == 1 and np.array_equal(state["params"]["w"], np.arange(50_000.0))
  (line,) = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert re.search(r"step 2 .*ChecksumError: params\.w\[0:50000\] differs from its checksum", line)
  assert "restored step 1 instead; moved to" in line and "\n" not in line
  (moved,) = os.listdir(os.path.join(directory, "corrupt"))
  assert moved.startswith("2-") and ckpt.steps() == [1]
  # The step is written again when the run reaches it: orbax no longer sees it as existing.
  assert ckpt.save(2, {"params": {"w": jnp.zeros(3)}}, {"batches": {}})
  ckpt.close()
  assert checkpointing.Checkpointer(directory, keep=3).steps() == [1, 2]


def test_unreadable_metadata_is_damage_not_another_model(tmp_path):
  """A deleted _METADATA read as a checkpoint of no leaves: "another model", and no fallback."""
  directory = str(tmp_path / "checkpoints")
  ckpt = checkpointing.Checkpointer(directory, keep=3)
  state = {"params": {"w": jnp.arange(6.0)}, "step": jnp.int32(1)}
  for step in (1, 2):
    ckpt.save(step, state, {"batches": {}})
  ckpt.close()
  _delete_metadata(os.path.join(directory, "2"))
  wanted = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  ckpt = checkpointing.Checkpointer(directory, keep=3)
  ckpt.check_matches(wanted)  # no ConfigError
  step, restored, _ = ckpt.restore_latest(wanted)
  ckpt.close()
  assert step == 1 and np.array_equal(restored["params"]["w"], np.arange(6.0))
  # Readable metadata of other shapes still is another model.
  wanted["params"]["w"] = jax.ShapeDtypeStruct((5,), jnp.float32)
  with pytest.raises(ConfigError, match="another model"):
    checkpointing.Checkpointer(directory, keep=3).check_matches(wanted)


@pytest.mark.slow
@ORPHANED_READS
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_step_is_moved_aside_and_rewritten_bitwise(
  damage, nonfinite_run, data_dir, tmp_path, caplog
):
  """A truncated step was restored past but never rewritten (every later start repeated the
  fallback, and predict served the older step); a deleted _METADATA refused to start as
  "another model"; flipped bytes were restored without a word. Each is now one line, the step
  before it is restored, and the run writes the step again, bit for bit what it was."""
  workdir = str(tmp_path / "work")
  shutil.copytree(nonfinite_run[0], workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  DAMAGE[damage](os.path.join(checkpoints, "4"))
  with caplog.at_level("INFO"), pytest.raises(train.NonFiniteError):
    train.train_and_evaluate(nonfinite_config(data_dir), workdir, devices=jax.devices()[:1])
  messages = [r.getMessage() for r in caplog.records]
  (line,) = [m for m in messages if "is damaged" in m]
  assert line.startswith(f"checkpoint at step 4 in {checkpoints} is damaged ("), line
  assert re.search(rf"restored step 2 instead; moved to {checkpoints}/corrupt/4-\d+-\d+, ", line)
  assert "\n" not in line and "resumed from step 2" in messages
  assert not [r for r in caplog.records if r.exc_info and "mm_jax" in r.pathname]
  # Moved aside as it was (never deleted), and step 4 written again by the resumed run.
  (moved,) = glob.glob(os.path.join(checkpoints, "corrupt", "4-*"))
  assert os.path.exists(os.path.join(moved, "state", "_METADATA")) == (damage != "metadata deleted")
  ckpt = checkpointing.Checkpointer(checkpoints, keep=3)
  assert ckpt.steps() == [1, 2, 4]
  step, state, _ = ckpt.restore_latest(None)  # verified against its checksums
  ckpt.close()
  assert step == 4
  _assert_bitwise_equal(state, _restore_step(os.path.join(nonfinite_run[0], "checkpoints"), 4))
  gc.collect()  # the failed restore's orphaned reads: here, under this test's warning filter


# --- the same faults on the command line: one line each, no traceback floods ----------------


def _one_device_command(workdir, data_dir):
  """nonfinite_config as `python -m mm_jax.main` flags (run in a process of one CPU device)."""
  overrides = {
    "data.data_dir": data_dir,
    "mesh.data": 1,
    "model.moe.noisy_gating": False,
    "train.num_steps": 10,
    "train.log_every": 1,
    "train.eval_every": 1000,
    "train.eval_batches": 0,
    "train.checkpoint_every": 1,
    "train.fixed_batch": True,
    "train.inject_nonfinite_steps": "(" + ",".join(map(str, INJECTED)) + ")",
    "train.max_consecutive_nonfinite": LIMIT,
  }
  return [
    f"--config=configs/multimodel.py:tiny,tasks={TASK}",
    f"--workdir={workdir}",
    *[f"--config.{key}={value}" for key, value in overrides.items()],
    *short_kernels.flags(),
  ]


# `python -m mm_jax.main`, with the step-N save failing as on a full disk (N from $FULL_AT).
_FULL_DISK_MAIN = """
import errno, os, runpy, sys
import orbax.checkpoint as ocp
save = ocp.JsonCheckpointHandler._save_fn
async def full_disk(self, x, directory):
  if os.path.basename(os.path.dirname(str(directory))).startswith(os.environ["FULL_AT"] + "."):
    raise OSError(errno.ENOSPC, "No space left on device", str(directory))
  return await save(self, x, directory)
ocp.JsonCheckpointHandler._save_fn = full_disk
sys.argv = ["mm_jax.main", *sys.argv[1:]]
runpy.run_module("mm_jax.main", run_name="__main__", alter_sys=True)
"""


def _console(args, env, main=("-m", "mm_jax.main")):
  """(exit status, stdout and stderr) of the trainer's command line."""
  out = subprocess.run(
    [sys.executable, *main, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
  )
  return out.returncode, out.stdout + out.stderr


def _assert_quiet(output):
  """No traceback, no asyncio noise, no error records of orbax's threads on the console."""
  for noise in ("Traceback", "Event loop is closed", "Exception ignored"):
    assert noise not in output, output[-3000:]
  assert not re.search(r"^E\d{4} .*\.py:\d+\]", output, re.M), output[-3000:]


@pytest.mark.slow
def test_on_the_command_line_damage_and_a_full_disk_are_one_line_each(
  nonfinite_run, data_dir, tmp_path
):
  """A truncated step gave ~500 "Event loop is closed" tracebacks, all steps truncated 58,147
  lines of them, a full disk 277 traceback lines. Now: one line each, and the run resumes."""
  env = dict(_env(), XLA_FLAGS=os.environ["XLA_FLAGS"].replace("count=8", "count=1"))
  original = os.path.join(nonfinite_run[0], "checkpoints")

  # The newest step truncated: one line, step 2 restored, step 4 moved aside and rewritten.
  workdir = str(tmp_path / "truncated")
  shutil.copytree(nonfinite_run[0], workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  _truncate(os.path.join(checkpoints, "4"))
  rc, output = _console(_one_device_command(workdir, data_dir), env)
  assert rc == 3, output[-3000:]  # the run's own streak of NaN steps, as when it was written
  _assert_quiet(output)
  (line,) = [line for line in output.splitlines() if "is damaged" in line]
  assert "step 4" in line and "restored step 2 instead; moved to" in line, line
  assert "resumed from step 2" in output
  assert len(glob.glob(os.path.join(checkpoints, "corrupt", "4-*"))) == 1
  # A process of one device sums in another order than the reference's (one device of eight):
  # the same step to float tolerance (test_a_damaged_step_is_moved_aside_and_rewritten_bitwise
  # compares bit for bit, in this process).
  _assert_bitwise_equal(_restore_step(checkpoints, 4), _restore_step(original, 4), rtol=1e-4)
  print(output)

  # A full disk at step 4's save: one line and exit 4; once space is back, the run resumes.
  workdir = str(tmp_path / "full")
  shutil.copytree(nonfinite_run[0], workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  shutil.rmtree(os.path.join(checkpoints, "4"))  # step 4 is still to be written
  rc, output = _console(
    _one_device_command(workdir, data_dir), dict(env, FULL_AT="4"), ("-c", _FULL_DISK_MAIN)
  )
  assert rc == 4, output[-3000:]
  _assert_quiet(output)
  (line,) = [line for line in output.splitlines() if "rror:" in line]
  assert line.startswith("checkpoint error: cannot write the step 4 checkpoint"), line
  assert "No space left on device" in line, line
  print(output)
  assert checkpointing.Checkpointer(checkpoints, keep=3).steps() == [1, 2]
  rc, output = _console(_one_device_command(workdir, data_dir), env)
  assert rc == 3 and "resumed from step 2" in output, output[-3000:]
  _assert_quiet(output)
  _assert_bitwise_equal(_restore_step(checkpoints, 4), _restore_step(original, 4), rtol=1e-4)

  # Every step truncated: one line, exit 4, nothing moved or deleted.
  workdir = str(tmp_path / "all")
  shutil.copytree(nonfinite_run[0], workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  for step in (1, 2, 4):
    _truncate(os.path.join(checkpoints, str(step)))
  before = _files(checkpoints)
  rc, output = _console(_one_device_command(workdir, data_dir), env)
  assert rc == 4, output[-3000:]
  _assert_quiet(output)
  (line,) = [line for line in output.splitlines() if "rror:" in line]
  assert line.startswith("checkpoint error: none of the 3 checkpoints"), line
  assert _files(checkpoints) == before
  print(output)


def test_sigterm_during_start_up_is_one_line_and_exit_143(tmp_path):
  """SIGTERM before the trainer's handler was installed killed it with a stack dump. It is
  recorded from the moment mm_jax.main is imported; with no loop to save, exit 143."""
  proc = subprocess.Popen(
    [sys.executable, "-m", "mm_jax.main", "--config=configs/multimodel.py:tiny"]
    + [f"--workdir={tmp_path / 'work'}"],
    cwd=REPO,
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  term = 1 << (signal.SIGTERM - 1)
  deadline = time.monotonic() + 60
  while proc.poll() is None and time.monotonic() < deadline:  # until SIGTERM is held or caught
    with open(f"/proc/{proc.pid}/status") as f:
      masks = dict(line.split(":\t") for line in f.read().splitlines() if ":\t" in line)
    if (int(masks["SigBlk"], 16) | int(masks["SigCgt"], 16)) & term:
      break
  proc.send_signal(signal.SIGTERM)
  output = proc.communicate(timeout=300)[0]
  assert proc.returncode == 143, output
  assert output.strip() == "preempted: SIGTERM during start-up: nothing to save", output
  assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("module", ["main", "evaluate", "predict", "gallery"])
def test_an_empty_workdir_is_refused_in_one_line(module, tmp_path):
  """--workdir= trained into the current directory (checkpoints in the repository root)."""
  args = [f"--config={REPO}/configs/multimodel.py:tiny"] if module == "main" else []
  args += ["--task=image_classification", "x"] if module == "predict" else []
  out = subprocess.run(
    [sys.executable, "-m", f"mm_jax.{module}", "--workdir=", *args],
    cwd=tmp_path,
    env=dict(_env(), PYTHONPATH=REPO),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 2, out.stderr
  (line,) = [line for line in out.stderr.splitlines() if "--workdir" in line]
  assert "--workdir is empty" in line and "Traceback" not in out.stderr, out.stderr
  assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_evaluate_refuses_bad_arguments_and_never_overwrites_results_with_fewer(
  nonfinite_run, tmp_path
):
  """--eval_batches=-1 exited 0 and replaced eval_stepN.json with {"results": {}}."""
  workdir = str(tmp_path / "work")
  shutil.copytree(nonfinite_run[0], workdir)
  kept = pathlib.Path(workdir, "eval_step4.json")
  kept.write_text('{"step": 4, "results": {"image_classification": {"accuracy": 50.0}}}')
  env = dict(_env(), XLA_FLAGS=os.environ["XLA_FLAGS"].replace("count=8", "count=1"))
  for bad in ("--eval_batches=-1", "--eval_batches=0", "--beam_size=0", "--tasks=no_such_task"):
    rc, output = _console([f"--workdir={workdir}", bad], env, ("-m", "mm_jax.evaluate"))
    assert rc == 2, output[-3000:]
    (line,) = [line for line in output.splitlines() if line.startswith("evaluate: error:")]
    assert bad.split("=")[1] in line, line
  assert json.loads(kept.read_text())["results"]  # untouched
  # Results that would lose a task, a metric or the settings go to a new file.
  fewer = {"step": 4, "eval_batches": 1, "beam_size": 1, "results": {}}
  assert evaluate.results_path(workdir, 4, fewer).name == "eval_step4-2.json"
  pathlib.Path(workdir, "eval_step4-2.json").write_text("{}")
  assert evaluate.results_path(workdir, 4, fewer).name == "eval_step4-3.json"
  same = dict(fewer, eval_batches=None, beam_size=None)
  same["results"] = {"image_classification": {"accuracy": 60.0, "top5": 90.0}}
  assert evaluate.results_path(workdir, 4, same).name == "eval_step4.json"
  assert evaluate.results_path(workdir, 5, fewer).name == "eval_step5.json"


# One of two processes (4 CPU devices each): saves its shards' checksums, restores step 2 and
# checks it holds step 2's values; then (after process 0 breaks the checksum of a shard process 1
# owns) restores again, and prints what it got.
_TWO_PROCESS_CHECKSUMS = """
import json, os, sys
import jax, numpy as np
index, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=index)
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from mm_jax import checkpointing
mesh = Mesh(np.array(jax.devices()), ("d",))
def state(scale):
  w = scale * np.arange(64 * 16, dtype=np.float32).reshape(64, 16)
  split, whole = NamedSharding(mesh, P("d")), NamedSharding(mesh, P())
  return {"params": {
    "w": jax.make_array_from_callback(w.shape, split, lambda i: w[i]),
    "b": jax.make_array_from_callback((16,), whole, lambda i: np.full(16, scale, np.float32)[i]),
  }}
def restore():
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state(1)
  )
  ckpt = checkpointing.Checkpointer(directory, keep=3)
  step, got, data = ckpt.restore_latest(target)
  ckpt.close()
  shards = [s.data for leaf in jax.tree.leaves(got) for s in leaf.addressable_shards]
  want = [s.data for leaf in jax.tree.leaves(state(step)) for s in leaf.addressable_shards]
  return step, data, all(np.array_equal(a, b) for a, b in zip(shards, want))
ckpt = checkpointing.Checkpointer(directory, keep=3)
for step in (1, 2):
  ckpt.save(step, state(step), {"process": index})
ckpt.close()
print("first", *restore(), flush=True)
multihost_utils.sync_global_devices("restored")
if index == 0:
  path = os.path.join(directory, "2", "checksums", "metadata")
  saved = json.loads(open(path).read())
  saved["leaves"]["params.w"]["40:48,0:16"] = "00000000"  # a shard on process 1's devices
  open(path, "w").write(json.dumps(saved))
multihost_utils.sync_global_devices("broken")
print("then", *restore(), sorted(os.listdir(directory)), flush=True)
"""


@pytest.mark.slow
def test_two_processes_check_their_own_shards_and_fall_back_together(tmp_path):
  """Each process checks the shards it holds; a mismatch on one makes both restore the step
  before (a process restoring another step than its peers would hang the run)."""
  import socket

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  directory = str(tmp_path / "checkpoints")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags.xla_flags(4))
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _TWO_PROCESS_CHECKSUMS, str(i), str(port), directory],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
  saved = json.loads(
    pathlib.Path(glob.glob(f"{directory}/corrupt/2-*")[0], "checksums", "metadata").read_text()
  )
  assert len(saved["leaves"]["params.w"]) == 8  # one checksum per shard, from both processes
  for index, output in enumerate(outputs):
    lines = output.splitlines()
    assert f"first 2 {{'process': {index}}} True" in lines, output[-3000:]
    assert f"then 1 {{'process': {index}}} True ['1', 'corrupt']" in lines, output[-3000:]
    (line,) = [line for line in lines if "is damaged" in line]
    reason = "params.w[40:48,0:16]" if index == 1 else "another process's shards"
    assert reason in line and "restored step 1 instead" in line, line
    _assert_quiet(output)


def test_a_failing_save_is_one_line_naming_the_directory(tmp_path):
  directory = tmp_path / "checkpoints"
  ckpt = checkpointing.Checkpointer(str(directory), keep=2)
  state = {"w": jnp.arange(6.0)}
  ckpt.save(1, state, {"batches": {}})
  ckpt.wait()
  # The disk "goes away": the checkpoint directory becomes a file mid-run.
  shutil.rmtree(directory)
  directory.write_text("not a directory")
  threads_before = set(threading.enumerate())
  with pytest.raises(checkpointing.CheckpointWriteError) as info:
    ckpt.save(2, state, {"batches": {}})
    ckpt.wait()
  message = str(info.value)
  assert "\n" not in message and str(directory) in message and "step 2" in message
  # Nothing of the failed save is left running: orbax's save threads, once started for a step
  # directory that cannot be created, wait 300 s for it and hold the process at exit.
  ckpt.close()
  left = [t.name for t in set(threading.enumerate()) - threads_before if t.is_alive()]
  assert not left, left


def test_small_replicated_arrays_are_saved_whole_without_compiling(devices, tmp_path):
  """Orbax's replica-parallel save cuts a replicated array into one slice per device, each cut a
  program compiled on the spot (hundreds for a small model: seconds at a run's first save).
  Below checkpointing.MIN_REPLICA_SLICE_BYTES per slice one replica writes it whole instead."""
  mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  # A shape no other test saves: slices of it would not be compiled yet.
  state = {"w": jax.device_put(jnp.arange(8 * 29, dtype=jnp.float32).reshape(8, 29), replicated)}
  compiles = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep=1)
    ckpt.save(1, state, {"batches": {}})
    ckpt.close()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep=1)
  _, restored, _ = ckpt.restore_latest(None)
  ckpt.close()
  np.testing.assert_array_equal(restored["w"], np.asarray(state["w"]))


# --- kill -9 five times, then SIGTERM: resumed runs end bitwise where an unbroken run ends -

# Five kills at random steps, each resumed from the checkpoint the previous run left; every run
# pays a process start (imports, tracing), so the runs share the test run's compiles.
STEPS = 12
KILLS = 5  # kill -9 at 5 random steps
_LOGGED_STEP = re.compile(r"^step\s+(\d+)/\d+\s+loss")  # the trainer's progress line
_RESUMED = re.compile(r"resumed from step (\d+)")


# The run, as config overrides: the command line passes them as flags, the in-process reference
# run applies them to the same config.
_RUN = {
  "train.num_steps": STEPS,
  "train.log_every": 1,
  "train.checkpoint_every": 2,
  "train.eval_every": 1000,
  "train.eval_batches": 0,
}


def _command(workdir, data_dir):
  return [
    sys.executable,
    "-m",
    "mm_jax.main",
    f"--config=configs/multimodel.py:tiny,tasks={TASK}",
    f"--workdir={workdir}",
    f"--config.data.data_dir={data_dir}",
    *[f"--config.{key}={value}" for key, value in _RUN.items()],
    *short_kernels.flags(),
  ]


def _reference_config(data_dir):
  """The command line's config, built in this process."""
  config = short_kernels.apply(multimodel_config.get_config(f"tiny,tasks={TASK}"))
  config.data.data_dir = data_dir
  config.update_from_flattened_dict(_RUN)
  return config


def _env():
  """This session's XLA flags (so the command-line runs compile what the in-process reference
  compiled) and persistent compilation cache: only the first run pays for compiling; every
  program is cached, however quick its compile."""
  return dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=os.environ["XLA_FLAGS"],
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )


def _run_until(command, env, at_step, sig):
  """Runs until `at_step` has been logged, then sends `sig`; returns (rc, last step, resumed)."""
  proc = subprocess.Popen(
    command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  last, resumed, output = 0, 0, []
  for line in proc.stdout:
    output.append(line)
    if match := _RESUMED.search(line):
      resumed = int(match[1])
    if (match := _LOGGED_STEP.search(line)) and sig is not None:
      last = max(last, int(match[1]))
      if last >= at_step:
        proc.send_signal(sig)
        sig = None
  rc = proc.wait(timeout=600)
  return rc, last, resumed, "".join(output)


def _saved_steps(workdir):
  """Finalized checkpoints only (orbax renames a step's directory to its number when done). A
  run killed before its first save leaves no checkpoint directory."""
  directory = os.path.join(workdir, "checkpoints")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit())


def _final_state(workdir):
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=3)
  restored = ckpt.manager.restore(
    STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore())
  )
  ckpt.close()
  return jax.device_get(restored["state"]), restored["data"]


@pytest.mark.slow
def test_kill9_five_times_then_sigterm_resumes_bitwise(data_dir, tmp_path):
  env = _env()
  # The unbroken reference runs in this process: the same config, compiled programs (the
  # command-line runs read them from the cache) and trainer, without a process start.
  reference = str(tmp_path / "reference")
  train.train_and_evaluate(_reference_config(data_dir), reference)

  workdir = str(tmp_path / "interrupted")
  rng = random.Random(7)
  kill_steps = sorted(rng.sample(range(1, STEPS - 3), KILLS))
  lost, resumed_from = [], 0
  for at in kill_steps:
    rc, reached, resumed, output = _run_until(_command(workdir, data_dir), env, at, signal.SIGKILL)
    assert rc == -signal.SIGKILL, output[-3000:]
    assert resumed == resumed_from, output[-3000:]  # each run resumed where the last one left
    resumed_from = max(_saved_steps(workdir), default=0)
    lost.append(reached - resumed_from)
  # SIGTERM (steps still to go): a checkpoint of the step reached, then exit 143 with one line.
  rc, reached, resumed, output = _run_until(
    _command(workdir, data_dir), env, resumed_from + 1, signal.SIGTERM
  )
  assert rc == 143, output[-3000:]
  assert len([line for line in output.splitlines() if line.startswith("preempted:")]) == 1
  steps = _saved_steps(workdir)
  assert max(steps) >= reached and resumed == resumed_from
  rc, _, resumed, output = _run_until(_command(workdir, data_dir), env, STEPS, None)
  assert rc == 0 and resumed == max(steps), output[-3000:]
  print(f"kills at {kill_steps}, steps lost per kill {lost}, SIGTERM at {reached}: 0 lost")

  got, got_data = _final_state(workdir)
  want, want_data = _final_state(reference)
  leaves = jax.tree.leaves_with_path(want)
  assert len(leaves) == len(jax.tree.leaves(got))
  for (path, w), g in zip(leaves, jax.tree.leaves(got)):
    assert np.array_equal(np.asarray(w), np.asarray(g)), jax.tree_util.keystr(path)
  assert got_data == want_data  # the data iterator ended at the same position
