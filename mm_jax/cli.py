"""What every command does with its command line: a bad flag, override or config file is one
line on stderr and exit status 2, never usage text or a traceback.

Each command (mm_jax.main, predict, evaluate, gallery, aot, data.inspect) has `define_flags(values)`
and `main(argv, values)`: run as a program, its flags live on absl's global flag values (`start`);
a test may give each call fresh ones and run many commands in one process.
"""

import re
import sys

from absl import flags


def one_line(error: BaseException) -> str:
  """The cause, not the traceback: config files' own errors arrive wrapped in traceback text."""
  missing = re.search(r"No such file or directory: '([^']+)'", str(error))
  if missing:
    return f"{missing[1]}: no such file"
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    lines = lines[-1:]
  return " ".join(" ".join(lines).split())


def start(define_flags, main):
  """`python -m mm_jax.X`: the command's flags on absl's global flag values, then absl's app."""
  from absl import app

  define_flags(flags.FLAGS)
  app.run(main, flags_parser=parse_flags)


def parse_flags(argv, values=None):
  """absl's parsing, but a bad flag, override or config file is one stderr line and exit 2, not
  usage text or a traceback."""
  try:
    return (values or flags.FLAGS)(argv)
  except flags.Error as error:
    print(f"flag error: {one_line(error)}", file=sys.stderr, flush=True)
  except (AttributeError, KeyError) as error:  # an override naming a field the config lacks
    print(f"flag error: {_missing_field(error, argv)}", file=sys.stderr, flush=True)
  except Exception as error:  # noqa: BLE001 - a config file that is missing or does not load
    print(f"flag error: --config: {one_line(error)}", file=sys.stderr, flush=True)
  sys.exit(2)


def _missing_field(error: BaseException, argv) -> str:
  """ "--config.train.num_stepz: the config has no field 'num_stepz'; did you mean ..."."""
  text = str(error.args[0] if error.args else error)
  # ml_collections' message arrives with its quotes and newline escaped, as written in its repr.
  lines = text.replace("\\n", "\n").replace("\\'", "'").splitlines() or [""]
  key = lines[0].strip("\"' ")
  hint = " ".join(line.strip() for line in lines[1:] if line.strip()).rstrip("'")
  named = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.") and key in a]
  message = f"{', '.join(named) or key}: the config has no field {key!r}"
  return f"{message}; {hint[0].lower()}{hint[1:]}" if hint else message


def config_or_exit(flag_holder, command: str):
  """The --config flag's value; a config file that failed to load is one line and exit 2 (absl
  raises only when the value is first read)."""
  try:
    config = flag_holder.value
    if config is not None:
      config.get  # noqa: B018 - the placeholder of a failed load raises here
  except Exception as error:  # noqa: BLE001 - whatever loading the file raised
    fail(command, f"--config: {one_line(error)}")
  return config


def check_at_least(command: str, values, name: str, minimum: int):
  """An integer flag below `minimum` (unset is fine: the config decides) is one line, exit 2."""
  value = values[name].value
  if value is not None and value < minimum:
    fail(command, f"--{name}={value}: use {minimum} or more")


def fail(command: str, message: str, status: int = 2):
  print(f"{command}: error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)
