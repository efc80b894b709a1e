"""Entry point: `python -m mm_jax.main --config=configs/multimodel.py --workdir=DIR`.

Any `--config.field=value` overrides a config field. A bad config ends the run before anything is
compiled, with one line on stderr naming the field and the fix, and exit status 2.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/multimodel.py."
)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Checkpoints, TensorBoard logs, results.")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0 for jax.distributed (GPU clusters, tests)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed", False, "Call jax.distributed.initialize() (auto-detected on Cloud TPU)."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax

  # TensorFlow only feeds data: keep it off any accelerator JAX is using.
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")
  if _DISTRIBUTED.value or _COORDINATOR.value:
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  from mm_jax import train
  from mm_jax.sharding import ConfigError

  logging.info(
    "devices: %d (%s), processes: %d",
    jax.device_count(),
    jax.devices()[0].platform,
    jax.process_count(),
  )
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except ConfigError as error:
    print(f"config error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
