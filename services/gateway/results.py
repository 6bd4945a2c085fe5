"""Where the gateway's requests wait for their results: one JetStream consumer per tenant,
not a subscription and lookups per request.

``Producer.result`` subscribes to one job's result subject, looks the result up, waits,
looks again (only the stream's copy counts: a second copy the stream refused still
reaches core subscribers) and unsubscribes: five NATS operations per request, two of them
round trips (measured: a third of the gateway's CPU per request). Here a tenant's
results reach the gateway through one ordered consumer on that tenant's result subjects
(``ai.results.tenant.<t>.*``), created on the tenant's first request and kept: what it
delivers is what the stream stored, so a delivered result is the job's one result with no
lookup; a request only registers a future under its job id before the job is published.

Tenants stay apart by subject: a tenant's consumer filters on that tenant's subjects, and
a request waits in its own tenant's table. The consumer delivers every result of the
tenant (those of other producers, or of other gateway replicas, too): one dict lookup
each, and dropped.

While a request waits it still looks the result up now and then (``recheck_s``), as
``Producer.result`` does: a result the consumer did not deliver (it was being recreated
after a reconnect, say) is found all the same. A tenant whose consumer cannot be created
(NATS away, or a NATS user without the right) waits through ``Producer.result`` until a
later request creates it. The rights the consumer takes beyond a tenant producer's (the
``gateway`` user of ``deploy/nats/auth.conf``): publish ``$JS.API.CONSUMER.CREATE.AI_RESULTS``
(nats-py's ordered consumer names no consumer, so its create subject carries no filter) and
``$JS.FC.AI_RESULTS.*.*`` (flow control replies), subscribe to the client's inbox prefix
(its deliveries).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy

from schemas.results import JobResult, decode_result
from schemas.subjects import RESULTS_STREAM, result_subject
from services.errors import ResultTimeout
from services.producer import Producer

log = logging.getLogger("ridethrough.gateway")

#: How often a waiting request looks its result up too (as ``Producer.result`` does).
RECHECK_S = 1.0
#: How long the creation of a tenant's consumer may take (the request that creates it
#: waits that long at most; the tenant's others meanwhile wait without it).
CREATE_TIMEOUT_S = 1.0
#: The longest pause before a consumer that could not be created is tried again.
MAX_RETRY_S = 60.0


class TenantResults:
    """The results of one tenant as its consumer delivers them, and the requests waiting
    for them by job id."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self._prefix = result_subject("", tenant)
        self._waiting: dict[str, list[asyncio.Future[JobResult]]] = {}
        self._sub: Subscription | None = None
        # Made in the loop it serves (asking for the loop per request is a syscall).
        self._loop = asyncio.get_running_loop()
        #: Results delivered, and those that some request was waiting for.
        self.delivered = 0
        self.matched = 0

    @property
    def subscribed(self) -> bool:
        """Whether the tenant's consumer was created."""
        return self._sub is not None

    async def start(self, nc: Client) -> None:
        """Create the tenant's consumer: results stored from now on are delivered."""
        js = nc.jetstream(timeout=CREATE_TIMEOUT_S)
        self._sub = await js.subscribe(
            result_subject("*", self.tenant),
            stream=RESULTS_STREAM,
            cb=self._on_result,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW,
        )

    async def stop(self) -> None:
        """Remove the consumer; requests still waiting find their results by lookup."""
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def expect(self, job_id: str) -> asyncio.Future[JobResult]:
        """A future that the result of ``job_id`` delivered from now on completes."""
        fut: asyncio.Future[JobResult] = self._loop.create_future()
        self._waiting.setdefault(job_id, []).append(fut)
        return fut

    def forget(self, job_id: str, fut: asyncio.Future[JobResult]) -> None:
        """The request of ``fut`` no longer waits."""
        futs = self._waiting.get(job_id)
        if futs is None:
            return
        with contextlib.suppress(ValueError):
            futs.remove(fut)
        if not futs:
            del self._waiting[job_id]

    async def _on_result(self, msg: Msg) -> None:
        self.delivered += 1
        futs = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if not futs:
            return
        try:
            result = decode_result(msg.data)
        except Exception:  # a record this version cannot read: the lookup reports it
            log.exception("gateway: an unreadable result on %s", msg.subject)
            return
        self.matched += 1
        for fut in futs:
            if not fut.done():
                fut.set_result(result)


class ResultWaiter:
    """The gateway's waits for results, one ``TenantResults`` per tenant served."""

    def __init__(self, nc: Client, *, recheck_s: float = RECHECK_S) -> None:
        self.nc = nc
        self.recheck_s = recheck_s
        self._tenants: dict[str, TenantResults] = {}
        self._starting: dict[str, asyncio.Lock] = {}
        #: When a tenant whose consumer could not be created is tried again, and the
        #: pause before that.
        self._retry_at: dict[str, float] = {}
        self._pause: dict[str, float] = {}

    async def watch(self, tenant: str) -> TenantResults | None:
        """The results of ``tenant``, its consumer created on first use; ``None`` when it
        cannot be created now (the caller waits through ``Producer.result``)."""
        found = self._tenants.get(tenant)
        if found is not None:
            return found
        # Disconnected, refused a moment ago, or being created for another request: this
        # one goes on without (and a submit while NATS is away fails at once, not after a
        # consumer's timeout).
        if not self.nc.is_connected or time.monotonic() < self._retry_at.get(tenant, 0.0):
            return None
        lock = self._starting.setdefault(tenant, asyncio.Lock())
        if lock.locked():
            return None
        async with lock:
            results = TenantResults(tenant)
            try:
                await results.start(self.nc)
            except Exception as exc:
                # Tried again after a pause that doubles (a user without the right to
                # create consumers on AI_RESULTS: every request waits as Producer.result).
                pause = min(self._pause.get(tenant, self.recheck_s / 2) * 2, MAX_RETRY_S)
                self._pause[tenant] = pause
                self._retry_at[tenant] = time.monotonic() + pause
                log.log(
                    logging.WARNING if pause <= self.recheck_s else logging.DEBUG,
                    "gateway: no results consumer for tenant %s (tried again in %.0f s; "
                    "meanwhile each request looks its result up): %s",
                    tenant,
                    pause,
                    str(exc) or type(exc).__name__,
                )
                return None
            self._pause.pop(tenant, None)
            self._tenants[tenant] = results
            return results

    async def expect(self, tenant: str, job_id: str) -> Expected:
        """Start waiting for the result of ``tenant``'s job ``job_id``: one delivered
        from now on, or one found stored. Close what is returned."""
        results = await self.watch(tenant)
        if results is None:
            return Expected(job_id, None, None, self.recheck_s)
        return Expected(job_id, results, results.expect(job_id), self.recheck_s)

    @property
    def waiting(self) -> int:
        """Requests waiting now, over every tenant."""
        return sum(len(futs) for t in self._tenants.values() for futs in t._waiting.values())

    async def close(self) -> None:
        """Remove every consumer."""
        tenants, self._tenants = self._tenants, {}
        for results in tenants.values():
            await results.stop()


class Expected:
    """One request's wait for the result of its job."""

    __slots__ = ("_fut", "_recheck_s", "_results", "job_id")

    def __init__(
        self,
        job_id: str,
        results: TenantResults | None,
        fut: asyncio.Future[JobResult] | None,
        recheck_s: float,
    ) -> None:
        self.job_id = job_id
        self._results = results
        self._fut = fut
        self._recheck_s = recheck_s

    async def result(self, timeout: float, producer: Producer) -> JobResult:
        """The job's result: the one its tenant's consumer delivers, or the stored one
        ``producer`` finds every ``recheck_s`` (without a consumer: ``producer.result``).
        Raises ``ResultTimeout`` after ``timeout`` seconds."""
        fut = self._fut
        if fut is None:
            return await producer.result(self.job_id, timeout=timeout)
        deadline = time.monotonic() + timeout
        while True:
            if fut.done():
                return fut.result()
            left = deadline - time.monotonic()
            if left <= 0:
                raise ResultTimeout(f"no result for job {self.job_id} within {timeout}s")
            done, _ = await asyncio.wait((fut,), timeout=min(left, self._recheck_s))
            if done:
                return fut.result()
            stored = await producer.peek_result(self.job_id)
            if stored is not None:
                return stored

    def close(self) -> None:
        """Stop waiting."""
        if self._results is not None and self._fut is not None:
            self._results.forget(self.job_id, self._fut)
            self._fut.cancel()
