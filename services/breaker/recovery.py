"""What the prober and the replayer share: one supervised task per provider, each
acting only while its replica holds the provider's lease in ai_control.

A subclass names its lease (``probe``, ``replay``: keys ``<lease>.<provider>``) and
implements ``_run``; a NATS error inside ``_run`` (a node lost, a stream without a
leader for a moment) restarts it instead of ending the task, because the lease is
renewed by a task of its own and would otherwise keep every other replica from
taking over a provider nobody serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Iterable
from typing import ClassVar, Self

from nats.js import JetStreamContext

from schemas.subjects import CONTROL_BUCKET
from services.breaker.board import HealthBoard
from services.breaker.lease import LeaseKeeper
from services.config import Settings
from services.tasks import raise_if_cancelling


def service_owner(role: str) -> str:
    """An id for a prober or replayer replica: role, host and process."""
    return f"{role}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


class LeasedPerProvider:
    """The base of ``Prober`` and ``Replayer``."""

    #: The lease's key prefix, and the name of the work in log lines.
    lease: ClassVar[str]
    log: ClassVar[logging.Logger]

    def __init__(
        self, js: JetStreamContext, settings: Settings, providers: Iterable[str], *, owner: str
    ) -> None:
        self.js = js
        self.settings = settings
        self.owner = owner
        self.board = HealthBoard(js, settings.providers, settings.breaker)
        self._names = sorted(providers)
        self._tasks: list[asyncio.Task[None]] = []
        self._leases: list[LeaseKeeper] = []

    async def start(self) -> Self:
        """Start the board, the leases and one task per provider."""
        await self.board.start()
        control = await self.js.key_value(CONTROL_BUCKET)
        for name in self._names:
            keeper = LeaseKeeper(
                control, f"{self.lease}.{name}", self.owner, self.settings.replay.lease_s
            )
            self._leases.append(keeper.start())
            self._tasks.append(asyncio.create_task(self._supervise(name, keeper)))
        return self

    def leases(self) -> dict[str, LeaseKeeper]:
        """Per provider, this replica's lease keeper (``held``: whether it acts for it)."""
        return dict(zip(self._names, self._leases, strict=False))

    async def stop(self) -> None:
        """Stop the tasks, clean up (``_stopped``), give the leases up."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._stopped()
        for keeper in self._leases:
            await keeper.stop()
        await self.board.stop()

    async def _stopped(self) -> None:
        """What a subclass releases once its tasks have ended."""

    async def _supervise(self, name: str, lease: LeaseKeeper) -> None:
        while True:
            try:
                await self._run(name, lease)
            except Exception as exc:
                raise_if_cancelling()  # being stopped: a timeout raced the cancellation
                self.log.warning("%s of %s interrupted, resuming: %r", self.lease, name, exc)
                await asyncio.sleep(self.settings.breaker.board_poll_s)

    async def _run(self, name: str, lease: LeaseKeeper) -> None:
        """The work for provider ``name``; it checks ``lease.held`` before acting."""
        raise NotImplementedError
