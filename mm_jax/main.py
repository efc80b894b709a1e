"""Entry point: `python -m mm_jax.main --config=configs/multimodel.py --workdir=DIR`."""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/multimodel.py).")
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Where checkpoints and logs go.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax

  logging.info("devices: %s", jax.devices())
  print(_CONFIG.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
