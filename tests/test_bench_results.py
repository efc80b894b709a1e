"""bench/results.py: what a bench prints lands in bench/results/NAME.md under one header line."""

import re

from bench import results


def test_recorded_writes_what_was_printed_under_a_header(tmp_path, capsys):
  with results.recorded("demo", directory=str(tmp_path)):
    print("| measure | value |")
    print("| step | 0.750 s |")
  shown = capsys.readouterr().out
  assert "| step | 0.750 s |" in shown  # still printed
  lines = (tmp_path / "demo.md").read_text().splitlines()
  assert re.fullmatch(r"\d{4}-\d{2}-\d{2} · commit \S+ · .+ \(\d+ CPUs\)", lines[0]), lines[0]
  assert lines[1:] == ["", "```", "| measure | value |", "| step | 0.750 s |", "```"]


def test_nothing_is_written_when_the_bench_fails(tmp_path):
  try:
    with results.recorded("broken", directory=str(tmp_path)):
      print("half a table")
      raise RuntimeError("bench failed")
  except RuntimeError:
    pass
  assert not (tmp_path / "broken.md").exists()


def test_a_successful_absl_exit_still_writes(tmp_path):
  try:
    with results.recorded("absl", directory=str(tmp_path)):
      print("done")
      raise SystemExit(0)
  except SystemExit:
    pass
  assert "done" in (tmp_path / "absl.md").read_text()
