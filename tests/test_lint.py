"""ruff (configured in ruff.toml) is part of the test suite, so CI enforces it."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ruff(*args):
  return subprocess.run(
    [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True
  )


def test_ruff_lint_clean():
  result = _ruff("check", ".")
  assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_clean():
  result = _ruff("format", "--check", ".")
  assert result.returncode == 0, result.stdout + result.stderr
