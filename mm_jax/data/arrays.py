"""Train batches saved as arrays: prepared where TensorFlow is, trained on where it is not.

  python -m mm_jax.data.arrays save --config=configs/multimodel.py[:variant] [--config.x=y ...]
      --steps=N --out=DIR [--devices=1]

`save` reads N steps of the real input pipeline (tf.data, exactly as mm_jax.train reads them),
merges each step's task batches into the step's task groups (grouping.merge_batches) and writes
DIR/step_00000.npz, ... (one array per group and key, named "group/key") beside DIR/manifest.json:
the config file, variant and --config overrides it was made from, the config itself (JSON), the
number of devices its batch layout was made for, the task-group plan and the batch shapes.

`ArrayBatches(DIR)` reads them back without TensorFlow: `config()` rebuilds the same config (checked
against the saved JSON), and iterating yields each step's merged batch, the dict mm_jax.train's
loop hands to `sharding.global_batch`. This module imports no TensorFlow at the top: only `save`
loads the pipeline. bench/gpu_step.py times the whole train step on such batches on a machine
without TensorFlow.
"""

import importlib.util
import json
import os
import sys

import numpy as np

MANIFEST = "manifest.json"
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def step_path(directory: str, step: int) -> str:
  return os.path.join(directory, f"step_{step:05d}.npz")


def config_json(config) -> str:
  return config.to_json_best_effort(sort_keys=True)


def load_config(config_file: str, config_arg: str | None, overrides: dict):
  """`get_config(config_arg)` of `config_file` (relative to the repo, or absolute), then each
  dotted override set as the command line's --config.x=y would set it."""
  path = config_file if os.path.isabs(config_file) else os.path.join(_REPO, config_file)
  spec = importlib.util.spec_from_file_location("_saved_batches_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(config_arg) if config_arg is not None else module.get_config()
  for dotted, value in overrides.items():
    *parents, name = dotted.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    if isinstance(node[name], tuple) and isinstance(value, list):
      value = _tuples(value)
    node[name] = value
  return config


def _tuples(value):
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _value_at(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def command_line_overrides(argv, config) -> dict:
  """{dotted path: its value in `config`} for each --config.x=y of `argv` (values as parsed)."""
  paths = [a.split("=", 1)[0][len("--config.") :] for a in argv if a.startswith("--config.")]
  return {path: _value_at(config, path) for path in paths}


def _json_value(value):
  return [_json_value(v) for v in value] if isinstance(value, tuple | list) else value


def save(config, steps: int, out: str, *, devices=None, config_source=None, batches=None) -> dict:
  """Writes `steps` steps of merged train batches and the manifest to `out`; returns the manifest.

  `devices` (default: one) decides the run's data-parallel size and so each task's batch size.
  `config_source` = (config file, variant arg, overrides) is what `ArrayBatches.config` rebuilds
  the config from. `batches` replaces the pipeline with an iterator of per-task batches (tests).
  """
  import jax

  from mm_jax import grouping
  from mm_jax import run as run_lib
  from mm_jax import step as step_lib

  devices = list(devices if devices is not None else jax.devices()[:1])
  run = run_lib.build(config, devices)
  if batches is None:
    from mm_jax.data import pipeline

    pipeline.ensure_prepared(config)
    batches = pipeline.TrainIterator(config, tasks=run.tasks, read_layout=run.read_layout(0, 1))
  os.makedirs(out, exist_ok=True)
  for step in range(steps):
    merged = grouping.merge_batches(run.plan, next(batches))
    step_lib.check_batch_shapes(merged, run.batch_specs, 1)
    arrays = {
      f"{group}/{key}": value for group, batch in merged.items() for key, value in batch.items()
    }
    np.savez_compressed(step_path(out, step), **arrays)
  config_file, config_arg, overrides = config_source or (None, None, {})
  manifest = {
    "config_file": config_file,
    "config_arg": config_arg,
    "overrides": {k: _json_value(v) for k, v in overrides.items()},
    "config": json.loads(config_json(config)),
    "devices": len(devices),
    "steps": steps,
    "plan": [{"name": g.name, "tasks": list(g.tasks)} for g in run.plan],
    "batch_specs": {
      group: {key: [list(s.shape), str(s.dtype)] for key, s in specs.items()}
      for group, specs in run.batch_specs.items()
    },
  }
  with open(os.path.join(out, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)
  return manifest


class ArrayBatches:
  """The saved steps of a `save` directory, in order: {group: {key: np.ndarray}} per step."""

  def __init__(self, directory: str):
    self.directory = directory
    with open(os.path.join(directory, MANIFEST)) as f:
      self.manifest = json.load(f)

  def __len__(self) -> int:
    return self.manifest["steps"]

  def step(self, index: int) -> dict[str, dict[str, np.ndarray]]:
    merged: dict[str, dict[str, np.ndarray]] = {}
    with np.load(step_path(self.directory, index)) as arrays:
      for name in arrays.files:
        group, key = name.split("/", 1)
        merged.setdefault(group, {})[key] = arrays[name]
    return merged

  def __iter__(self):
    return (self.step(i) for i in range(len(self)))

  def config(self):
    """The config the batches were saved with, rebuilt from its file, variant and overrides."""
    m = self.manifest
    if m["config_file"] is None:
      raise ValueError(f"{self.directory}: saved without a config file to rebuild the config from")
    config = load_config(m["config_file"], m["config_arg"], m["overrides"])
    if json.loads(config_json(config)) != m["config"]:
      raise ValueError(
        f"{self.directory}: {m['config_file']} rebuilds another config than the batches were "
        "saved with (the config file changed since): save them again"
      )
    return config

  def check(self, run) -> None:
    """The saved plan and batch shapes against a run built from `config()`."""
    plan = [{"name": g.name, "tasks": list(g.tasks)} for g in run.plan]
    specs = {
      group: {key: [list(s.shape), str(s.dtype)] for key, s in batch.items()}
      for group, batch in run.batch_specs.items()
    }
    if plan != self.manifest["plan"] or specs != self.manifest["batch_specs"]:
      raise ValueError(
        f"{self.directory}: the run's task groups or batch shapes differ from the saved ones "
        f"(saved for {self.manifest['devices']} device(s), this run has {run.mesh.size})"
      )


def _config_source(argv, config_flag: str, config) -> tuple:
  """(config file relative to the repo where inside it, variant arg, overrides) of a command."""
  path, _, arg = config_flag.partition(":")
  path = os.path.abspath(path)
  if path.startswith(_REPO + os.sep):
    path = os.path.relpath(path, _REPO)
  return path, (arg or None), command_line_overrides(argv, config)


def main(argv=None):
  from absl import app, flags
  from ml_collections import config_flags

  default = os.path.join(_REPO, "configs", "multimodel.py")
  config = config_flags.DEFINE_config_file("config", default, "Config file (as main.py).")
  steps = flags.DEFINE_integer("steps", 4, "Train steps of batches to save.")
  out = flags.DEFINE_string("out", None, "Directory to write.", required=True)
  devices = flags.DEFINE_integer("devices", 1, "Devices the batch layout is made for.")

  def run(args):
    if len(args) != 2 or args[1] != "save":
      raise app.UsageError("usage: python -m mm_jax.data.arrays save --config=... --out=DIR")
    import jax

    available = jax.devices()
    if devices.value > len(available):
      raise app.UsageError(f"--devices={devices.value}: this process has {len(available)}")
    config_flag = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), default)
    source = _config_source(sys.argv, config_flag, config.value)
    manifest = save(
      config.value, steps.value, out.value, devices=available[: devices.value], config_source=source
    )
    print(
      f"saved {steps.value} steps to {out.value}: groups {[g['name'] for g in manifest['plan']]}"
    )

  app.run(run, argv)


if __name__ == "__main__":
  main()
