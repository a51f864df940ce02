"""Progress and ETA: the steady-state step time leaves compilation out."""

import pytest

from helpers import tiny_pretrain_config
from lost_jax.recipes import pretrain
from lost_jax.training import metrics


def _marked(per_step: list[float], start: int = 0, **kwargs) -> metrics.StepClock:
  """A StepClock given steps start+1, start+2, ... that took `per_step` seconds each."""
  clock, t = metrics.StepClock(start=start, **kwargs), 0.0
  for i, dt in enumerate(per_step, start=start + 1):
    t += dt
    clock.mark(i, t)
  return clock


def test_the_step_time_after_warm_up_leaves_compilation_out():
  # Step 1 compiles (30 s), step 2 still warms up (2 s), then 0.5 s a step.
  assert metrics.StepClock(start=0).eta(0, 100) == "?"
  assert _marked([30.0, 2.0, 0.5]).seconds_per_step() == pytest.approx(0.5)
  clock = _marked([30.0, 2.0] + [0.5] * 8)
  assert clock.seconds_per_step() == pytest.approx(0.5)
  assert clock.eta(10, 100) == "0:00:45"
  # Averaged since the start, as the ETA was computed before: 3.6 s a step, 7x too long.
  assert sum([30.0, 2.0] + [0.5] * 8) / 10 == pytest.approx(3.6)


def test_one_off_pauses_are_left_out_and_a_new_pace_is_followed():
  # An evaluation (20 s) and a recompilation (40 s) among 0.5 s steps.
  clock = _marked([30.0, 2.0] + [0.5] * 6 + [20.5] + [0.5] * 4 + [40.0] + [0.5] * 3)
  assert clock.seconds_per_step() == pytest.approx(0.5)
  # A dense phase at 1 s a step, then a sparse one at 0.4 s: followed within window / 2.
  clock = _marked([30.0, 2.0] + [1.0] * 20 + [0.4] * 11, window=20)
  assert clock.seconds_per_step() == pytest.approx(0.4)


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
def test_the_estimate_after_five_steps_is_within_half_of_the_real_step_time(tmp_path,
                                                                             monkeypatch):
  monkeypatch.setattr(metrics, "StepClock", _RecordingClock)
  # Steps of ~0.1-0.2 s (on 2 CPU cores), so scheduling jitter is small beside them.
  cfg = tiny_pretrain_config("lost", seq_len=256, steps=100, batch_size=16, log_every=1,
                             eval_every=1000, ckpt_every=1000,
                             model=dict(d_model=128, ffn_dim=256, n_heads=4))
  pretrain.train_and_evaluate(cfg, str(tmp_path), stop_at=25)
  (clock,) = _RecordingClock.made
  real = (clock.times[25] - clock.times[5]) / 20      # the steps after the estimate
  since_start = (clock.times[5] - clock.created) / 5  # the old estimate: compile included
  assert clock.estimates[5] == pytest.approx(real, rel=0.5), (clock.estimates[5], real)
  assert since_start > 2 * real, (since_start, real)
