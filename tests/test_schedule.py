"""The run's clock: durations, the time-budgeted learning rate, progressive resizing and guidance phases."""

from __future__ import annotations

import pytest

from tumor_xai.schedule import Schedule, guidance_ramp, lr_factor, parse_duration


def test_durations():
    assert parse_duration("2h") == 7200 and parse_duration("90m") == 5400 and parse_duration("1h30m") == 5400
    assert parse_duration("300s") == 300 and parse_duration("45") == 45 and parse_duration(12.5) == 12.5
    for bad in ("", "2 hours", "h", "1x", "-5m"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


def test_step_schedule_is_the_plain_warmup_cosine():
    s = Schedule(epochs=10, steps_per_epoch=10, warmup_steps=10)
    assert [s.lr_factor(k) for k in (0, 9, 55, 100)] == [lr_factor(k, 100, 10) for k in (0, 9, 55, 100)]
    assert not s.done(99) and s.done(100) and s.image_size(0.5) == 224


def test_time_budget_follows_the_clock_to_zero(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("tumor_xai.schedule.time.monotonic", lambda: now[0])
    s = Schedule(epochs=100, steps_per_epoch=50, warmup_steps=10_000, time_budget=100.0)
    s.start()
    assert s.lr_factor(0) < 0.01
    now[0] += 5.0  # 5 % of the budget: the warm-up ends there even though its step count is far off
    assert s.lr_factor(10) == pytest.approx(1.0)
    now[0] += 47.5  # half-way through what is left
    assert s.lr_factor(11) == pytest.approx(0.5, abs=1e-6)
    now[0] += 47.5
    assert s.lr_factor(12) == pytest.approx(0.0, abs=1e-9) and s.done(12)


def test_resumed_clock_continues_from_the_time_spent(monkeypatch):
    monkeypatch.setattr("tumor_xai.schedule.time.monotonic", lambda: 50.0)
    s = Schedule(epochs=1, steps_per_epoch=1, warmup_steps=1, time_budget=100.0, spent=40.0)
    s.start()
    assert s.elapsed() == pytest.approx(40.0) and s.progress(0) == pytest.approx(0.4)


def test_progressive_resizing_and_guidance_phases():
    s = Schedule(epochs=10, steps_per_epoch=10, warmup_steps=1, low_res_size=128, full_res_fraction=0.3)
    sizes = [s.image_size(p / 100) for p in range(101)]
    assert sizes[0] == 128 and set(sizes[:70]) == {128, 160} and set(sizes[70:]) == {224}
    assert sizes == sorted(sizes) and all(v % 32 == 0 for v in sizes)
    assert s.guidance(0.69, 7, 5.0) == 0.0  # off at low resolution, whatever the epoch warm-up says
    assert 0.0 < s.guidance(0.72, 7, 5.0) < 1.0 and s.guidance(0.8, 8, 5.0) == 1.0
    plain = Schedule(epochs=10, steps_per_epoch=10, warmup_steps=1)
    assert plain.guidance(0.3, 3.75, 5.0) == guidance_ramp(3.75, 5.0) == pytest.approx(0.5)
