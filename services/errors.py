"""The one error tree of ridethrough.

    RidethroughError
    ├── ConfigError              settings that cannot work (unknown provider kind, missing key file)
    ├── NatsUnavailable          no connection to NATS could be made or kept
    ├── TopologyError            a stream, consumer or bucket could not be created or updated
    ├── JobRejected              the producer refused a job; nothing was published
    │   ├── InvalidJob           the job does not match the schema (names the field)
    │   ├── PayloadTooLarge      the encoded job exceeds the server's max_payload
    │   └── UnknownProvider      no stream accepts jobs for this provider
    ├── ResultTimeout            no result arrived within the timeout
    ├── BodyUnavailable          a large job's body cannot be used: gone (``body_missing``)
    │                            or not the one submitted (``invalid``); the job is dead
    ├── Unmappable               a request cannot be translated faithfully to another API
    │                            (also a ValueError); the job is parked, never mangled
    ├── BenchError               a benchmark could not run (a child died, jobs went missing)
    └── ProviderError            a provider call failed (raised by adapters only)
        ├── TransientError       worth retrying: overloaded, 5xx, timeouts, connection errors
        │   └── RateLimited      429 with a retry-after: slow down, not an outage
        └── PermanentError       retrying cannot help: 4xx, quota, refused before sending,
                                 a wrong base_url (config)

Inside the adapters only (never raised past them, always classified into a ProviderError):
``classify.MalformedResponse`` (a success reply with no complete message) and
``classify.ErrorObject`` (a success status whose body is an error object).

Adapters translate SDK exceptions into ``ProviderError`` once, at the boundary,
with ``raise ... from exc``; nothing above an adapter sees SDK classes.
"""

from __future__ import annotations


class RidethroughError(Exception):
    """Base of every error ridethrough raises on purpose."""


class ConfigError(RidethroughError):
    """Settings that cannot work."""


class NatsUnavailable(RidethroughError):
    """No connection to NATS could be made or kept."""


class TopologyError(RidethroughError):
    """A stream, consumer or bucket could not be created or updated."""


class JobRejected(RidethroughError):
    """The producer refused a job; nothing was published."""


class InvalidJob(JobRejected):
    """The job does not match the schema; the message names the offending field."""


class PayloadTooLarge(JobRejected):
    """The encoded job is larger than the server accepts."""

    def __init__(self, size: int, limit: int, why: str = "") -> None:
        super().__init__(
            f"job is {size} bytes, over the {limit} bytes a job may have on this server "
            + (why or "(its max_payload less room for a park record or dead letter)")
        )
        self.size = size
        self.limit = limit


class UnknownProvider(JobRejected):
    """No stream accepts jobs for this provider."""


class ResultTimeout(RidethroughError):
    """No result arrived within the timeout."""


class BodyUnavailable(RidethroughError):
    """A large job's body (``services/bodies.py``) cannot be used; ``reason`` is the dead
    letter's: ``body_missing`` (gone) or ``invalid`` (not the body submitted)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Unmappable(RidethroughError, ValueError):
    """The request cannot be translated faithfully; ``field`` names the offending part.

    ``field`` is a path into the source request (``messages[2].content[0].type``,
    ``temperature``); the job is parked, never sent in a mangled form.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(field, reason)
        self.field = field
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


class BenchError(RidethroughError):
    """A benchmark could not run (a child process died, jobs went missing)."""


class ProviderError(RidethroughError):
    """A provider call failed.

    ``reason`` is a stable snake_case word (``overloaded``, ``server_error``,
    ``timeout``, ``connection``, ``rate_limited``, ``invalid_request``, ``auth``,
    ``not_found``, ``too_large``, ``quota``, ``refused``...). ``retry_after`` is
    the delay in seconds the provider asked for, if any. ``status`` is the HTTP
    status, when there was one.
    """

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.status = status
        self.retry_after = retry_after


class TransientError(ProviderError):
    """Worth retrying later; counts towards the provider's breaker."""

    retryable = True


class RateLimited(TransientError):
    """The provider asked us to slow down; does not by itself mean an outage."""


class PermanentError(ProviderError):
    """Retrying cannot help; the job goes to the dead letters with ``reason``."""
