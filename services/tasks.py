"""Long-lived loops that stop when told to, on Python 3.11 too."""

from __future__ import annotations

import asyncio


def raise_if_cancelling() -> None:
    """Raise ``CancelledError`` if the current task has been asked to stop.

    On Python 3.11 ``asyncio.wait_for`` (inside every nats-py request) can lose a
    cancellation that races its timeout or its result: it raises ``TimeoutError`` or
    returns normally instead. A loop that catches ``Exception`` and carries on then
    never ends, and whoever awaits it after ``cancel()`` waits forever (seen: a
    health board's poll loop hung a replayer's stop). Every service loop calls this
    once per turn, after the work that may fail and before it sleeps.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
