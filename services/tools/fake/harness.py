"""A fake provider on its own event loop in a daemon thread, for synchronous code (tests).

``run_in_thread()`` starts one and returns a ``FakeProviderThread``, whose methods (counters,
outages, config, waits) are safe to call from any other thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from services.tools.fake.faults import FaultConfig
from services.tools.fake.server import FakeProvider

_T = TypeVar("_T")


class FakeProviderThread:
    """A ``FakeProvider`` running on its own event loop in a daemon thread.

    Every method is safe to call from any other thread. Use as a context manager or call
    ``stop()``.
    """

    def __init__(
        self,
        provider: FakeProvider,
        loop: asyncio.AbstractEventLoop,
        thread: threading.Thread,
        url: str,
    ) -> None:
        """Wrap a started ``provider`` served by ``loop`` in ``thread``; see ``run_in_thread``."""
        self.provider = provider
        self.url = url
        self._loop = loop
        self._thread = thread

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = 30.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _call(self, fn: Callable[[], _T]) -> _T:
        async def call() -> _T:
            return fn()

        return self._run(call())

    def counters(self) -> dict[str, Any]:
        """A snapshot of the request counters (see ``FakeProvider.counters``)."""
        return self._call(lambda: self.provider.counters)

    def reset_counters(self) -> None:
        """Zero every counter and empty the call log."""
        self._call(self.provider.reset_counters)

    def calls(self, model: str | None = None, since: float | None = None) -> dict[str, Any]:
        """The call log (see ``FakeProvider.calls``)."""
        return self._call(lambda: self.provider.calls(model, since))

    def large_requests(self) -> list[dict[str, Any]]:
        """Large request bodies received (see ``FakeProvider.large_requests``)."""
        return self._call(self.provider.large_requests)

    def start_outage(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Start a runtime outage (arguments of ``Faults.start_outage``)."""
        return self._call(lambda: self.provider.start_outage(*args, **kwargs))

    def stop_outage(self) -> None:
        """End the runtime outage, if any."""
        self._call(self.provider.stop_outage)

    def record_requests(self, on: bool = True) -> None:
        """Start (or stop) keeping every inference request's exact bytes."""
        self._call(lambda: self.provider.record_requests(on))

    def recorded(self, door: str | None = None) -> list[dict[str, Any]]:
        """The requests recorded (see ``FakeProvider.recorded``)."""
        return self._call(lambda: self.provider.recorded(door))

    def status_page(self, **patch: Any) -> dict[str, Any]:
        """Script the status page (fields of ``statuspage.PagePatch``); return its state."""
        from services.tools.fake.statuspage import PagePatch

        return self._call(lambda: self.provider.status_page.patch(PagePatch(**patch)))

    def set_config(self, config: FaultConfig) -> None:
        """Replace the fault configuration."""
        self._call(lambda: self.provider.set_config(config))

    def wait_for_counters(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """Block until ``predicate(counters)`` holds; ``TimeoutError`` after ``timeout``."""
        return self._run(self.provider.wait_for_counters(predicate, timeout), None)

    def stop(self) -> None:
        """Stop the server, its loop and its thread (idempotent)."""
        if not self._thread.is_alive():
            return
        try:
            self._run(self.provider.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> FakeProviderThread:
        """Return the handle itself."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop the server."""
        self.stop()


def _loop_main(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


def run_in_thread(
    config: FaultConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> FakeProviderThread:
    """Start a fake provider on its own loop in a daemon thread and return its handle."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=_loop_main, args=(loop,), name="fake-provider", daemon=True)
    thread.start()
    provider: FakeProvider | None = None

    async def create_and_start() -> tuple[FakeProvider, str]:
        created = FakeProvider(config)
        return created, await created.start(host, port)

    try:
        provider, url = asyncio.run_coroutine_threadsafe(create_and_start(), loop).result(30)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        raise
    return FakeProviderThread(provider, loop, thread, url)
