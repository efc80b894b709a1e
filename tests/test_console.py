"""The progress line: rate and time left from the training steps alone, counted by hand."""

from mm_jax import console


def test_format_seconds_keeps_the_two_largest_units():
  assert console.format_seconds(45) == "45s"
  assert console.format_seconds(20 * 60 + 37) == "20m37s"
  assert console.format_seconds(3600 + 2 * 60 + 59) == "1h02m"
  assert console.format_seconds(-3) == "0s"


def test_rate_and_eta_leave_out_evaluation_time():
  now = [100.0]
  progress = console.Progress(start_step=0, num_steps=800, clock=lambda: now[0])
  now[0] += 50.0  # 50 steps in 40 s of training and 10 s of evaluation
  progress.exclude(10.0)
  line, rate = progress.report(50, 3.4121)
  assert rate == 50 / 40
  # 750 steps left at 1.25 steps/s: 600 s; 50 s since the start.
  assert line == "step  50/800  loss 3.412  1.25 steps/s  elapsed 50s  ETA 10m00s"
  now[0] += 20.0  # the exclusion applied once: the next 25 steps took 20 s
  line, rate = progress.report(75, 3.0)
  assert rate == 25 / 20 and line.endswith("elapsed 1m10s  ETA 9m40s")
