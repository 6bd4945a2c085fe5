"""Retry delays: exponential with jitter, never shorter than retry-after, never past the cap."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.config import WorkerSettings
from services.lifecycle.decide import backoff_delay

SETTINGS = WorkerSettings(backoff_base_s=1.0, backoff_max_s=60.0)


@given(st.integers(min_value=1, max_value=50))
def test_delay_is_within_the_jittered_exponential_window(attempt: int) -> None:
    """Attempt n waits between half and all of min(cap, base * 2^(n-1))."""
    cap = min(60.0, 2.0 ** (attempt - 1))
    assert cap / 2 <= backoff_delay(attempt, SETTINGS, None) <= cap


@given(st.integers(min_value=1, max_value=20), st.floats(min_value=0, max_value=60))
def test_retry_after_is_a_floor(attempt: int, retry_after: float) -> None:
    """The provider's retry-after is honoured up to the backoff cap."""
    assert backoff_delay(attempt, SETTINGS, retry_after) >= retry_after


@given(
    st.integers(min_value=1, max_value=10**6),
    st.none() | st.floats(min_value=0, max_value=1e300),
)
def test_no_delay_exceeds_the_cap(attempt: int, retry_after: float | None) -> None:
    """Whatever the attempt count or the retry-after (10^9 s included), at most backoff_max_s:
    a provider asking for more is having an outage, and the breaker hears of it instead."""
    assert 0 <= backoff_delay(attempt, SETTINGS, retry_after) <= 60.0
