"""The exception every config check raises: a module of its own, so that checking a config does
not import the mesh code, the data code or JAX."""


class ConfigError(ValueError):
  """A bad configuration value: the message is one line naming the field and the fix."""
