"""What the settle module refuses to do, without NATS: a message is never acked unless an
outcome was written for it."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.jobs import Job
from services.lifecycle.decide import Call, Duplicate
from services.lifecycle.settle import Delivery, Settler


class StubMsg:
    """The part of a delivered message ``Settler.settle`` touches."""

    subject = "ai.jobs.a.normal"
    data = b"{}"

    def __init__(self) -> None:
        self.acked = self.nakked = 0

    async def ack(self) -> None:
        self.acked += 1

    async def nak(self, delay: float | None = None) -> None:
        self.nakked += 1


def _delivery(msg: Any, job: Job | None) -> Delivery:
    return Delivery(msg, attempts=1, provider="a", job=job)


JOB = Job(id="j1", provider="a", model="m", request={})


async def test_a_call_is_not_an_outcome_to_settle_and_is_never_acked() -> None:
    msg = StubMsg()
    with pytest.raises(TypeError):
        await Settler(js=None).settle(_delivery(msg, JOB), Call())  # type: ignore[arg-type]
    assert msg.acked == msg.nakked == 0


async def test_an_outcome_about_a_job_needs_the_job() -> None:
    msg = StubMsg()
    with pytest.raises(TypeError):
        await Settler(js=None).settle(_delivery(msg, None), Duplicate())  # type: ignore[arg-type]
    assert msg.acked == 0


async def test_a_duplicate_is_acked_and_counted() -> None:
    msg = StubMsg()
    settler = Settler(js=None)  # type: ignore[arg-type]
    await settler.settle(_delivery(msg, JOB), Duplicate())
    assert msg.acked == 1 and settler.stats.duplicates_skipped == 1
