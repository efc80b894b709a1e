"""What a training run prints: one progress line per report, so that the console says at any
moment how far along the run is and when it will end. Everything else goes to TensorBoard.

  step   200/1500  loss 3.412  1.05 steps/s  elapsed 3m10s  ETA 20m37s
"""

import time


def format_seconds(seconds: float) -> str:
  """1h02m, 20m37s, 45s: the two largest units, as a person reads a countdown."""
  seconds = max(0, int(round(seconds)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


class Progress:
  """Steps per second and the time left, from the training steps alone.

  The rate is measured over the steps since the previous report, with the time spent outside
  training (evaluation, by `exclude`) taken out: an evaluation every few hundred steps must not
  make the ETA jump. The time left counts training only.
  """

  def __init__(self, start_step: int, num_steps: int, clock=time.monotonic):
    self.num_steps = num_steps
    self._clock = clock
    self._start = clock()
    self._last_step, self._last_time = start_step, self._start
    self._excluded = 0.0

  def exclude(self, seconds: float) -> None:
    """Time spent since the last report on something other than training steps."""
    self._excluded += seconds

  def report(self, step: int, loss: float) -> tuple[str, float]:
    """(the progress line, the steps per second since the last report)."""
    now = self._clock()
    busy = max(now - self._last_time - self._excluded, 1e-9)
    rate = (step - self._last_step) / busy
    self._last_step, self._last_time, self._excluded = step, now, 0.0
    width = len(str(self.num_steps))
    eta = (self.num_steps - step) / rate if rate > 0 else float("inf")
    line = (
      f"step {step:>{width}}/{self.num_steps}  loss {loss:.3f}  {rate:.2f} steps/s  "
      f"elapsed {format_seconds(now - self._start)}  "
      f"ETA {format_seconds(eta) if eta != float('inf') else '?'}"
    )
    return line, rate
