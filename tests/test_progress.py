"""Progress and ETA: the steady-state step time leaves compilation out."""

import pytest

from helpers import tiny_pretrain_config
from lost_jax.recipes import pretrain
from lost_jax.training import metrics


def test_the_step_time_after_warm_up_leaves_compilation_out():
  # Step 1 compiles (30 s), step 2 still warms up (2 s), then 0.5 s a step.
  clock = metrics.StepClock(start=0, warmup=2)
  assert clock.seconds_per_step() is None and clock.eta(0, 100) == "?"
  times, t = {}, 0.0
  for step, dt in enumerate([30.0, 2.0] + [0.5] * 8, start=1):
    t += dt
    times[step] = t
    clock.mark(step, t)
  assert clock.seconds_per_step() == pytest.approx(0.5)
  assert clock.eta(10, 100) == "0:00:45"
  # Since the start, as the ETA was computed before: 4.0 s a step, 8x too long.
  assert times[10] / 10 == pytest.approx(3.6)


def test_before_the_warm_up_ends_the_last_interval_stands_in():
  clock = metrics.StepClock(start=40, warmup=2)   # a resumed run: it compiles again
  clock.mark(41, 100.0)
  assert clock.seconds_per_step() is None
  clock.mark(42, 103.0)
  assert clock.seconds_per_step() == pytest.approx(3.0)
  clock.mark(43, 104.0)
  clock.mark(44, 105.0)
  assert clock.seconds_per_step() == pytest.approx(1.0)
  assert metrics.format_seconds(3 * 3600 + 25 * 60 + 7.4) == "3:25:07"
  assert metrics.format_seconds(30 * 3600) == "30:00:00"


class _RecordingClock(metrics.StepClock):
  """A StepClock that keeps the time of every step and its estimate then."""
  made = []

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.created = self.clock()
    self.times, self.estimates = {}, {}
    _RecordingClock.made.append(self)

  def mark(self, step, now=None):
    super().mark(step, now)
    self.times[step] = self.last[1]
    self.estimates[step] = self.seconds_per_step()


@pytest.mark.slow
def test_the_estimate_after_four_steps_is_within_half_of_the_real_step_time(tmp_path,
                                                                             monkeypatch):
  monkeypatch.setattr(metrics, "StepClock", _RecordingClock)
  cfg = tiny_pretrain_config("lost", seq_len=128, steps=100, batch_size=8, log_every=1,
                             eval_every=1000, ckpt_every=1000)
  pretrain.train_and_evaluate(cfg, str(tmp_path), stop_at=24)
  (clock,) = _RecordingClock.made
  real = (clock.times[24] - clock.times[4]) / 20      # the steps after the estimate
  since_start = (clock.times[4] - clock.created) / 4  # the old estimate: compile included
  assert clock.estimates[4] == pytest.approx(real, rel=0.5), (clock.estimates[4], real)
  assert since_start > 2 * real, (since_start, real)
