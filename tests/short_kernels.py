"""Config overrides for tests whose subject is not the kernel size: the trainer, packing, reach.

The tiny config's kernel-15 and kernel-5 convolutions unroll into one multiply-add per tap;
kernel 3 keeps every block (dilations, causal padding, attention queries) at a fraction of the
ops, so steps trace and compile faster (test_model.py and test_packing.py check the kernel-15
and kernel-5 convolutions themselves). Both the in-process and the command-line runs of a test
must use them alike.
"""

SHORT_KERNELS = {
  "model.conv_group2": ((3, 1), (3, 4)),
  "model.attention_query_convs": ((3, 1), (3, 4)),
}


def apply(config):
  """`config` with SHORT_KERNELS set (in place); returns it."""
  config.update_from_flattened_dict(SHORT_KERNELS)
  return config


def model_overrides() -> dict:
  """The same overrides as keyword arguments of test_model.tiny_model (fields of config.model)."""
  return {key.removeprefix("model."): value for key, value in SHORT_KERNELS.items()}


def flags() -> list[str]:
  """The same overrides as `--config.x=y` command-line flags."""
  return [f"--config.{key}={value}" for key, value in SHORT_KERNELS.items()]
