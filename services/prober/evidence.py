"""The evidence of a provider's status page: read under the provider's probe lease, written
to ai_control when it changes, announced on ``ai.events.evidence.<provider>``.

One reader per provider among prober replicas: the replica holding ``probe.<provider>``.
About every ``status_page_interval_s`` (jittered by a third either way) it reads the page
(``statuspage.py``); when what the page says differs from ``evidence.<provider>`` it writes
the new ``Evidence`` by compare-and-set on the revision (a replica that lost the lease a
moment ago cannot overwrite a newer record) and, when the degraded components, the other
ones or the incidents changed, publishes an ``EvidenceEvent`` (msg id from the revision:
a retried publish is one event). Evidence is never proof: nothing here moves a breaker.

A page that cannot be read changes nothing: the last evidence stays as it is (degraded
stays degraded, operational stays operational) and no event is published. The streak is
logged once (a warning at its first failed read, an info line when the page reads again)
and kept in the probe lease's ``info`` under ``status_page`` (last good read, failed reads
in a row, the last problem), which the holder rewrites anyway as it renews the lease:
``ridethrough status`` shows a page that has not been read lately as stale, at no write.

A provider without ``status_page_url`` reads no page; its lease holder deletes evidence
left by an earlier configuration (once per lease taken), so no forgotten page lowers a
threshold for ever.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import aiohttp
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from schemas.codec import encode
from schemas.events import EvidenceEvent
from schemas.health import Evidence, try_decode_evidence
from schemas.subjects import (
    CONTROL_BUCKET,
    MSG_ID_HEADER,
    evidence_event_subject,
    evidence_key,
)
from services.breaker.board import warn_unreadable
from services.breaker.lease import LeaseKeeper
from services.config import Settings
from services.jetstream.kv import compare_and_set, read_entry
from services.prober.statuspage import PageRead, evidence_of, read_page, shown_url
from services.tasks import raise_if_cancelling

log = logging.getLogger("ridethrough.prober.statuspage")

#: The key of the probe lease's ``info`` that tells how the page reads.
LEASE_INFO: str = "status_page"


def _changed(before: Evidence | None, after: Evidence) -> bool:
    """Whether an operator (and the event log) should hear of ``after``: a new degraded
    component, incident or other component, or one gone. No record counts as nothing."""
    b = before or Evidence(provider=after.provider)
    return (b.degraded, b.other, b.incidents) != (after.degraded, after.other, after.incidents)


class StatusPageWatch:
    """Reads one provider's status page while ``lease`` (``probe.<provider>``) is held.

    Counters for tests and logs: ``reads`` (pages fetched), ``failed`` (failed reads in a
    row), ``written`` (evidence records written), ``events`` (events published).
    """

    def __init__(
        self,
        js: JetStreamContext,
        settings: Settings,
        provider: str,
        lease: LeaseKeeper,
        *,
        by: str,
    ) -> None:
        self.js = js
        self.settings = settings
        self.provider = provider
        self.lease = lease
        self.by = by
        self.url = settings.providers[provider].status_page_url
        self.page = shown_url(self.url) if self.url else ""
        self.key = evidence_key(provider)
        self.reads = 0
        self.failed = 0
        self.written = 0
        self.events = 0
        self._last_read: float | None = None
        self._cleared = False

    def start(self) -> asyncio.Task[None]:
        """Run in the background until cancelled."""
        return asyncio.create_task(self.run(), name=f"status-page-{self.provider}")

    def _interval(self) -> float:
        mean = self.settings.breaker.status_page_interval_s
        return random.uniform(mean * 2 / 3, mean * 4 / 3)

    async def run(self) -> None:
        """Read, record, sleep; idle while another replica holds the lease. Never ends
        but by cancellation: a failure is logged, and the next interval tries again."""
        b = self.settings.breaker
        kv: KeyValue | None = None
        headers = {"User-Agent": "ridethrough-prober"}
        async with aiohttp.ClientSession(headers=headers) as session:
            while True:
                raise_if_cancelling()
                if not self.lease.held:
                    self._cleared = False
                    await asyncio.sleep(b.board_poll_s)
                    continue
                try:
                    kv = kv or await self.js.key_value(CONTROL_BUCKET)
                    if self.url is None:
                        await self.clear(kv)
                    else:
                        await self.check(session, kv, self.url)
                except Exception as exc:  # NATS away for a moment: next interval
                    raise_if_cancelling()
                    log.warning("status page of %s: evidence not recorded: %r", self.provider, exc)
                await asyncio.sleep(self._interval())

    async def check(self, session: aiohttp.ClientSession, kv: KeyValue, url: str) -> PageRead:
        """Read the page once and record what it says (nothing, if it cannot be read)."""
        read = await read_page(session, url, self.settings.breaker.status_page_timeout_s)
        self.reads += 1
        if read.summary is None:
            if self.failed == 0:
                log.warning(
                    "status page of %s (%s) cannot be read: %s; the last evidence stands",
                    self.provider,
                    self.page,
                    read.problem,
                )
            self.failed += 1
        else:
            if self.failed:
                log.info(
                    "status page of %s reads again after %d failed reads",
                    self.provider,
                    self.failed,
                )
            self.failed = 0
            self._last_read = time.time()
        self.lease.info[LEASE_INFO] = {
            "page": self.page,
            "read_at": self._last_read,
            "failed": self.failed,
            "problem": read.problem,
        }
        if read.summary is not None:
            p = self.settings.providers[self.provider]
            await self.record(kv, evidence_of(self.provider, p, read.summary, self.page))
        return read

    async def record(self, kv: KeyValue, evidence: Evidence) -> bool:
        """Write ``evidence`` if the page says something new; publish an event if an
        operator should hear of it. Whether this call wrote."""
        raw, revision = await read_entry(kv, self.key)
        current = try_decode_evidence(raw) if raw else None
        if current is not None and current.says() == evidence.says():
            return False
        if raw and current is None:
            warn_unreadable(CONTROL_BUCKET, self.key, revision, raw, "no evidence (replaced)")
        new_revision = await compare_and_set(kv, self.key, encode(evidence), revision)
        if new_revision is None:  # another replica wrote first: read again next interval
            return False
        self.written += 1
        if _changed(current, evidence):
            await self._announce(evidence, f"evidence:{self.provider}:{new_revision}")
        return True

    async def clear(self, kv: KeyValue) -> None:
        """No page configured: delete evidence left from an earlier configuration (once per
        lease taken)."""
        if self._cleared:
            return
        raw, _ = await read_entry(kv, self.key)
        if raw is not None:
            await kv.delete(self.key)
            log.info("status page of %s: none configured, old evidence deleted", self.provider)
            current = try_decode_evidence(raw)
            if current is not None and _changed(current, Evidence(provider=self.provider)):
                gone = Evidence(provider=self.provider)
                await self._announce(gone, f"evidence:{self.provider}:cleared:{time.time_ns()}")
        self._cleared = True

    async def _announce(self, evidence: Evidence, msg_id: str) -> None:
        summary = evidence.summary() if evidence.page else "no status page configured"
        log.info("status page of %s: %s", self.provider, summary)
        event = EvidenceEvent(
            provider=self.provider, evidence=evidence, summary=summary, by=self.by
        )
        subject = evidence_event_subject(self.provider)
        for attempt in range(4):
            try:
                await self.js.publish(subject, encode(event), headers={MSG_ID_HEADER: msg_id})
                self.events += 1
                return
            except Exception as exc:  # the evidence is stored; the event is its echo
                if attempt == 3:
                    log.warning("status page event %s not published: %r", msg_id, exc)
                    return
                await asyncio.sleep(0.2 * 2**attempt)
