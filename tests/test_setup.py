"""The environment every other test relies on."""

import jax


def test_eight_cpu_devices(devices):
  assert {d.platform for d in devices} == {"cpu"}
  assert jax.device_count() == 8
