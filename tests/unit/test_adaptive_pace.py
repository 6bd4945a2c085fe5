"""The adaptive replay pace (``services/replayer/replayer.py: adapt``): a slow start until
the workers push back, then additive increase and multiplicative decrease, always within
``initial_rate`` and the safety cap."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.config import ReplaySettings
from services.replayer.replayer import ProviderReplay, pushed_back

R = ReplaySettings(initial_rate=5, ramp_factor=2, ramp_interval_s=1, max_rate=2000)


def _run(readings: list[int | None], r: ReplaySettings = R) -> list[ProviderReplay]:
    prog = ProviderReplay(r.initial_rate, 0.0, r.ramp_interval_s)
    seen = []
    for i, queued in enumerate(readings, 1):
        before = ProviderReplay(prog.rate)
        before.slow_start = prog.slow_start
        prog.advance(float(i), r, 0.1, queued)
        seen.append(before)
    seen.append(prog)
    return seen


@given(st.lists(st.none() | st.integers(0, 100_000), min_size=1, max_size=60))
def test_the_rate_stays_between_the_floor_and_the_cap(readings: list[int | None]) -> None:
    """Whatever the queue says, the rate never leaves [initial_rate, max_rate]."""
    for prog in _run(readings):
        assert R.initial_rate <= prog.rate <= R.max_rate


@given(st.lists(st.none() | st.integers(0, 100_000), min_size=1, max_size=60))
def test_each_step_follows_the_rule(readings: list[int | None]) -> None:
    """A pushback halves the rate (to the floor at least) and ends the slow start for
    good; otherwise the rate doubles during the slow start and grows by ``increase``
    after it (both capped)."""
    states = _run(readings)
    for before, after, queued in zip(states, states[1:], readings, strict=False):
        if pushed_back(before.rate, R, queued):
            assert after.rate == max(R.initial_rate, before.rate * R.decrease_factor)
            assert not after.slow_start
        elif before.slow_start:
            assert after.rate == min(before.rate * R.ramp_factor, R.max_rate)
            assert after.slow_start
        else:
            assert after.rate == min(before.rate + R.increase, R.max_rate)
        if not before.slow_start:
            assert not after.slow_start


def test_an_unknown_queue_is_no_pushback_and_a_small_one_neither() -> None:
    """None (unread) never pushes back; nor does a queue under one batch or under
    queue_target_s seconds of the rate."""
    assert not pushed_back(1000, R, None)
    assert not pushed_back(5, R, R.batch_size)
    assert not pushed_back(1000, R, int(1000 * R.queue_target_s))
    assert pushed_back(1000, R, int(1000 * R.queue_target_s) + 1)
    assert pushed_back(5, R, R.batch_size + 1)


def test_workers_that_keep_up_get_the_whole_cap_and_a_stalled_fleet_the_floor() -> None:
    """An empty queue takes the slow start to the cap in log2(cap / initial) steps; a
    queue that never drains brings it to initial_rate and keeps it there."""
    fast = _run([0] * 12)[-1]
    assert fast.rate == R.max_rate and fast.slow_start
    stuck = _run([0] * 6 + [10**6] * 12)[-1]
    assert stuck.rate == R.initial_rate and not stuck.slow_start and stuck.pushbacks == 12


def test_the_ramp_pace_ignores_the_queue() -> None:
    """pace = ramp: doubling to the cap whatever the queue says (the old slow start)."""
    ramp = R.model_copy(update={"pace": "ramp"})
    assert _run([10**6] * 4, ramp)[-1].rate == 5 * 2**4
