"""bench/results.py: what a bench prints lands in bench/results/NAME.md under one header line."""

import re
import subprocess

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


def test_the_benches_own_outputs_do_not_count_as_changes(tmp_path):
  """A bench that writes a tracked plot before its table still names a clean checkout's commit;
  a changed source file does count."""

  def git(*args):
    subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

  (tmp_path / "bench" / "results").mkdir(parents=True)
  (tmp_path / "bench" / "results" / "curves.png").write_bytes(b"old")
  (tmp_path / "model.py").write_text("x = 1\n")
  git("init", "-q")
  git("add", ".")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
  clean = results.commit(str(tmp_path))
  assert re.fullmatch(r"[0-9a-f]{7,}", clean), clean
  (tmp_path / "bench" / "results" / "curves.png").write_bytes(b"new")
  assert results.commit(str(tmp_path)) == clean
  (tmp_path / "model.py").write_text("x = 2\n")
  assert results.commit(str(tmp_path)) == clean + "+changes"
